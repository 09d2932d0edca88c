"""The fast generation path's logic on the CPU: which path is chosen and why, cache shapes, batch
padding, the static cache reused across calls, and the roofline arithmetic. (The compiled path
itself needs a GPU: benchmarks/gpu_fast_path.py measures it.)"""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from vlmlab.run import fast_generate as fg
from tests.conftest import tiny_inputs


# ---- shapes and batches ------------------------------------------------------------------------
@pytest.mark.parametrize("prompt,new,expected", [(592, 32, 640), (608, 32, 640), (609, 32, 704), (1, 1, 64), (16, 48, 64)])
def test_cache_length_rounds_up_to_the_bucket(prompt, new, expected):
    assert fg.cache_length(prompt, new) == expected
    assert fg.cache_length(prompt, new, bucket=1) == prompt + new


def test_cache_length_refuses_nonsense():
    with pytest.raises(ValueError, match="must be positive"):
        fg.cache_length(0, 32)


@pytest.mark.parametrize("n,compiled,expected", [(10, 64, 64), (64, 64, 64), (80, 64, 80), (3, None, 3)])
def test_padded_size(n, compiled, expected):
    assert fg.padded_size(n, compiled) == expected


@pytest.mark.parametrize("n,limit,expected", [(512, 192, 171), (512, 128, 128), (512, 600, 512), (7, 2, 2), (1, 64, 1)])
def test_even_batches(n, limit, expected):
    size = fg.even_batches(n, limit)
    assert size == expected
    batches = -(-n // size)
    assert size <= limit and batches == -(-n // limit)  # no more batches than the limit needs
    assert batches * size - n < batches  # the padding is less than one row per batch


# ---- choice of path ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_meta():
    from vlmlab.model.spec import spec

    return spec("vlmlab/tiny-captioner").modules  # a LlavaForConditionalGeneration on the meta device


def test_static_on_one_gpu(tiny_meta):
    mode, why = fg.choose_generation(tiny_meta, [0])
    assert mode == "static+graphs" and "one GPU" in why


@pytest.mark.parametrize("devices,needle", [(["cpu"], "not on a GPU"), ([0, 1], "split over 2 GPUs"), ([], "not on a GPU")])
def test_eager_fallback_says_why(tiny_meta, devices, needle):
    mode, why = fg.choose_generation(tiny_meta, devices)
    assert mode == "eager" and needle in why


def test_eager_when_the_model_does_not_declare_compile_support(tiny_meta):
    cls = type(type(tiny_meta).__name__ + "NoCompile", (type(tiny_meta),), {"_can_compile_fullgraph": False})
    model = cls.__new__(cls)  # only the class is read
    mode, why = fg.choose_generation(model, [0])
    assert mode == "eager" and "_can_compile_fullgraph" in why


def test_eager_for_a_quantisation_that_cannot_compile(tiny_meta):
    cls = type(tiny_meta)
    model = cls.__new__(cls)  # the class declares compile support, the instance's quantiser denies it
    vars(model)["hf_quantizer"] = SimpleNamespace(is_compileable=False)
    mode, why = fg.choose_generation(model, [0])
    assert mode == "eager" and "quantisation" in why


def test_asked_paths(tiny_meta):
    assert fg.choose_generation(tiny_meta, [0], "eager") == ("eager", "eager generate was asked for")
    assert fg.choose_generation(tiny_meta, [0], None)[0] == "static+graphs"
    with pytest.raises(ValueError, match="not possible here: not on a GPU"):
        fg.choose_generation(tiny_meta, ["cpu"], "static+graphs")
    with pytest.raises(ValueError, match="generation must be one of auto, static\\+graphs, eager"):
        fg.choose_generation(tiny_meta, [0], "fast")


def test_cache_keyword_follows_the_forward_signature(tiny_meta):
    def new(input_ids=None, cache=None, use_cache=None): ...
    def old(input_ids=None, past_key_values=None, use_cache=None): ...
    assert fg.cache_keyword(type(tiny_meta).forward) in ("cache", "past_key_values")
    assert fg.cache_keyword(new) == "cache" and fg.cache_keyword(old) == "past_key_values"


# ---- the static cache on the CPU (no compile there: transformers compiles on accelerators only) --
def test_static_cache_matches_eager_and_is_reused(tiny):
    import torch

    ms, model = tiny
    gen = fg.FastGenerator(model, prefill="eager")
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    with torch.inference_mode():
        for seed in (0, 1):  # the second call resets and reuses the first call's cache
            inputs = tiny_inputs(ms, 3, seed)
            eager = model.generate(**inputs, **kw)
            fast = gen.generate(inputs, **kw)
            assert torch.equal(fast, eager)
            if seed == 0:
                first_cache = gen._cache
        assert gen._cache is first_cache
        assert list(gen.compile_s) == [(3, fg.cache_length(inputs["input_ids"].shape[1], 5))]
        assert gen.batch_size == 3
        gen.generate(tiny_inputs(ms, 2), **kw)  # a new shape: a new cache, and the old one is let go
        assert gen.batch_size == 2 and gen._cache is not first_cache and len(gen.compile_s) == 2
    gen.close()
    assert gen.batch_size is None


def test_compiled_prefill_is_on_the_decoder_only_during_a_call(tiny, monkeypatch):
    import torch

    ms, model = tiny
    decoder, calls = model.get_decoder(), []

    def fake_compile(fn, **kw):  # inductor on two CPU cores takes minutes: count the calls instead
        assert kw == {"dynamic": False}

        def wrapped(*a, **k):
            calls.append(a[0].shape if a else k.get("input_ids", k.get("inputs_embeds")).shape)
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(torch, "compile", fake_compile)
    gen = fg.FastGenerator(model, prefill="decoder")
    assert "forward" not in vars(decoder)
    with torch.inference_mode():
        gen.generate(tiny_inputs(ms, 2), max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert calls, "the prefill went through the compiled forward"
        assert "forward" not in vars(decoder)  # gone again after the call
        n = len(calls)
        model.generate(**tiny_inputs(ms, 2), max_new_tokens=3, do_sample=False)  # plain generate: never the compiled one
    assert len(calls) == n


def test_an_error_lets_the_cache_go_and_keeps_the_last_good_batch(tiny, monkeypatch):
    import torch

    ms, model = tiny
    gen = fg.FastGenerator(model, prefill="eager")
    with torch.inference_mode():
        gen.generate(tiny_inputs(ms, 2), max_new_tokens=2, do_sample=False)
        monkeypatch.setattr(model, "generate", lambda **kw: (_ for _ in ()).throw(RuntimeError("CUDA out of memory")))
        with pytest.raises(RuntimeError, match="out of memory"):
            gen.generate(tiny_inputs(ms, 4), max_new_tokens=2, do_sample=False)
    assert gen._cache is None and gen.batch_size == 2


# ---- roofline ----------------------------------------------------------------------------------
def _toy_spec(tied=False):
    dims = SimpleNamespace(layers=2, heads=4, kv_heads=2, head_dim=8, hidden=32, vocab=100, vision_tokens=10,
                           vision_layers=1, vision_hidden=16)
    params = {"vision": 1000, "projector": 100, "embeddings": 3200, "layers": 20000, "norm": 32,
              "head": 0 if tied else 3200, "other": 0}
    return SimpleNamespace(dims=dims, tied_head=tied, params_by_component=lambda: dict(params))


def test_prefill_flops_by_hand():
    from vlmlab.observe import roofline

    s = _toy_spec()
    per_prompt = (2 * 20032 * 12 + 2 * 3200  # linear layers on 12 tokens, the head on the last one
                  + 2 * 2 * 4 * 8 * 12 ** 2  # causal attention: QK^T and AV, half each
                  + 2 * 1100 * 10 + 4 * 1 * 16 * 10 ** 2)  # the vision tower and its attention
    assert roofline.prefill_flops(s, 3, 12) == 3 * per_prompt


def test_decode_bytes_by_hand():
    from vlmlab.observe import roofline

    weights = (20000 + 32 + 3200) * 2
    kv = 2 * 2 * 2 * 8 * 50 * 4 * 2  # K and V, 2 layers, 2 KV heads of 8, 50 positions, batch 4, bf16
    assert roofline.decode_bytes(_toy_spec(), 4, 50) == weights + kv
    assert roofline.decode_bytes(_toy_spec(tied=True), 4, 50) == weights + kv  # a tied head reads the embedding
    assert roofline.decode_bytes(_toy_spec(), 4, 50, "int8") == weights / 2 + kv
    with pytest.raises(ValueError, match="unknown dtype"):
        roofline.decode_bytes(_toy_spec(), 1, 1, "fp8")


def test_achieved_rates_and_percentages():
    from vlmlab.observe import roofline

    s = _toy_spec()
    gpu = SimpleNamespace(bandwidth=1000.0, bf16_tflops=100.0)
    flops, moved = roofline.prefill_flops(s, 2, 12), roofline.decode_bytes(s, 2, 64)
    r = roofline.achieved(s, gpu, batch=2, prompt_tokens=12, prefill_s=flops / 50e12, decode_step_s=moved / 250e9,
                          kv_tokens=64)
    assert r["prefill_tflops"] == pytest.approx(50) and r["prefill_pct_peak"] == pytest.approx(50)
    assert r["decode_gbs"] == pytest.approx(250) and r["decode_pct_peak"] == pytest.approx(25)
    assert roofline.describe(r) == "prefill 50 TFLOP/s (50% of peak), decode 250 GB/s (25% of peak)"
    unknown = roofline.achieved(s, SimpleNamespace(bandwidth=None), batch=2, prompt_tokens=12, decode_step_s=1.0)
    assert unknown["decode_pct_peak"] is None and unknown["prefill_tflops"] is None
    assert roofline.decode_roofline_tokens_per_s(s, gpu, batch=2, kv_tokens=64) == pytest.approx(2 * 1e12 / moved)
    assert roofline.decode_roofline_tokens_per_s(s, SimpleNamespace(bandwidth=None)) is None


def test_llava_decode_roofline_on_an_h200():
    """The 7B's batch-1 decode reads about 13.5 GB a token: about 355 tokens/s at 4.8 TB/s."""
    from vlmlab.hardware import gpus
    from vlmlab.model.spec import spec
    from vlmlab.observe import roofline

    s = spec("llava-1.5-7b")
    assert roofline.decode_bytes(s, 1, 624) == pytest.approx(13.5e9, rel=0.01)
    assert roofline.decode_roofline_tokens_per_s(s, gpus("h200")[0], 1, 624) == pytest.approx(355, rel=0.01)


def test_generation_for_is_decided_once_per_loaded_model(tiny):
    _, model = tiny
    lm = SimpleNamespace(model=model, devices=["cpu"])
    mode, reason, gen = fg.generation_for(lm)
    assert (mode, gen) == ("eager", None) and "not on a GPU" in reason
    assert fg.generation_for(lm) == (mode, reason, gen)
    assert fg.generation_for(lm, "eager")[1] == "eager generate was asked for"
    fg.forget(lm)
    assert "_generation" not in vars(lm)


def test_a_longer_cache_of_the_same_batch_is_reused(tiny):
    import torch

    ms, model = tiny
    gen, notes = fg.FastGenerator(model, prefill="eager"), []
    gen.on_compile = notes.append
    with torch.inference_mode():
        gen.generate(tiny_inputs(ms, 2), max_new_tokens=60, do_sample=False)
        cache = gen._cache
        gen.generate(tiny_inputs(ms, 2), max_new_tokens=1, do_sample=False)  # a prefill-only call: same shape
    assert gen._cache is cache and len(gen.compile_s) == 1
    assert notes[0].startswith("preparing batch 2") and notes[1].startswith("batch 2 ready in")
    assert notes[1].endswith("(decode: eager)")  # on the CPU


# ---- batch size chosen by the planner ----------------------------------------------------------
def _fits(p, share):
    return all(sum(b.values()) <= share * p.hardware.by_index(i).free for i, b in p.memory.items())


def test_auto_batch_is_the_largest_that_leaves_headroom():
    import html

    import vlmlab
    from vlmlab.plan import planner

    p = vlmlab.plan("llava-1.5-7b", "h200", strategy="single", batch_size="auto", max_new_tokens=32)
    b = p.batch_size
    assert 8 <= b < planner.AUTO_MAX_BATCH and b % 8 == 0
    assert _fits(p, 1 - planner.AUTO_HEADROOM)
    bigger = vlmlab.plan("llava-1.5-7b", "h200", strategy="single", batch_size=b + 8, max_new_tokens=32)
    assert not _fits(bigger, 1 - planner.AUTO_HEADROOM)
    assert "batch_size='auto'" in p.batch_note and html.escape(p.batch_note) in p._repr_html_()
    assert vlmlab.Plan.from_json(p.to_json()).batch_note == p.batch_note


def test_auto_batch_caps_and_cpu_default_and_overrides():
    import vlmlab
    from vlmlab.plan import planner

    small = vlmlab.plan("paligemma-3b", "h200", strategy="single", batch_size="auto", max_new_tokens=32)
    assert small.batch_size == planner.AUTO_MAX_BATCH and "the most vlmlab picks" in small.batch_note
    assert vlmlab.plan(None, "cpu", batch_size="auto").batch_size == planner.AUTO_CPU_BATCH
    assert vlmlab.plan("llava-1.5-7b", "h200", strategy="single", batch_size=16).batch_size == 16  # a number wins
    assert vlmlab.plan("llava-1.5-7b", "h200", strategy="single").batch_size == 1  # the default is unchanged


def test_auto_batch_keeps_the_split_and_the_replicas():
    import vlmlab
    from vlmlab.plan import planner

    split = vlmlab.plan("llava-1.5-7b", "2x24GiB", strategy="split", batch_size="auto", max_new_tokens=32)
    assert split.strategy == "split" and split.batch_size >= 1 and _fits(split, 1 - planner.AUTO_HEADROOM)
    rep = vlmlab.plan("llava-1.5-7b", "2xh200", strategy="replicate", batch_size="auto", max_new_tokens=32)
    assert len(rep.replicas) == 2 and rep.batch_size % 8 == 0


def test_auto_batch_refusals():
    import vlmlab

    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 'big'"):
        vlmlab.plan("llava-1.5-7b", "h200", batch_size="big")
    with pytest.raises(ValueError, match="with a device_map give a number"):
        vlmlab.plan("llava-1.5-7b", "h200", batch_size="auto", device_map={"": 0})


# ---- card peaks --------------------------------------------------------------------------------
def test_bf16_peaks_from_the_hardware_table():
    from vlmlab.hardware import _tflops_of, gpus

    assert gpus("h200")[0].bf16_tflops == 989 and gpus("a100-40gb")[0].bf16_tflops == 312
    assert gpus("24GiB")[0].bf16_tflops is None and gpus("rtx4070")[0].bf16_tflops is None
    assert _tflops_of("NVIDIA H200") == 989 and _tflops_of("NVIDIA A100-SXM4-80GB") == 312
    assert _tflops_of("NVIDIA L40S") == 362 and _tflops_of("Some Unknown GPU") is None


# ---- bench and Profile report the path and the rates ------------------------------------------
def test_profile_reports_achieved_rates_on_the_cpu():
    import vlmlab

    prof = vlmlab.profile(progress=False, gpus="cpu")
    rates = prof.to_dict(samples=False, calls=False)["rates"]
    assert rates["prefill_tflops"] > 0 and rates["decode_gbs"] > 0
    assert rates["prefill_pct_peak"] is None and rates["decode_pct_peak"] is None  # a CPU has no peak in the table
    assert rates["batch"] == 8


def test_bench_rows_say_which_path_ran_and_its_rates():
    import vlmlab

    r = vlmlab.bench(None, strategies=["single"], gpus="cpu", random_weights=True, n_images=3, max_new_tokens=12,
                     progress=False, isolate=False)
    row = r.rows[0]
    assert row["generation"] == "eager" and "not on a GPU" in row["generation_reason"]
    assert row["batch_size"] == 3 and row["compile_s"] == 0.0  # 3 images: one batch of 3 (auto is 8 on the CPU)
    assert row["prefill_tflops"] > 0 and row["decode_gbs"] > 0 and row["wall_s"] >= row["seconds"]


# ---- regional compilation and the decode choice --------------------------------------------------
def test_stateless_blocks_of_every_layer_are_compiled_and_the_output_is_unchanged(tiny):
    import torch

    from vlmlab.run import compiled_blocks as cb

    ms, model = tiny
    layers = cb.decoder_layers(model)
    assert layers is model.get_decoder().layers
    assert [n for n, _ in cb.stateless_blocks(layers[0])] == ["mlp", "input_layernorm", "post_attention_layernorm"]
    calls = []

    def fake_compile(fn):  # inductor on two CPU cores takes minutes: record the calls instead
        def wrapped(*a, **k):
            calls.append(fn)
            return fn(*a, **k)
        return wrapped

    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    inputs = tiny_inputs(ms, 2)
    with torch.inference_mode():
        eager = model.generate(**inputs, **kw)
        try:
            assert cb.compile_blocks(model, fake_compile) == ["mlp", "input_layernorm", "post_attention_layernorm"]
            compiled = model.generate(**inputs, **kw)
        finally:
            cb.uncompile(model)
        assert torch.equal(compiled, eager)
        assert len(calls) == 3 * len(layers)  # the prefill only: decode steps (one token a row) run eager blocks
        n = len(calls)
        model.generate(**inputs, **kw)
    assert len(calls) == n  # uncompiled again


@pytest.mark.parametrize("cache_gb,how", [(0.3, "compiled"), (57, "graphs"), (150, "graphs")])
def test_decode_plan_compiles_where_small_kernels_would_weigh(cache_gb, how):
    # llava-1.5-7b on an H200: batch 1 (3.6 ms of traffic), batch 171 (18 ms), batch ~450
    chosen, why = fg.decode_plan(13.5e9, cache_gb * 1e9, 32, 4800)
    assert chosen == how
    assert "CUDA graph" in why and "ms of memory traffic" in why
    assert fg.decode_plan(13.5e9, 0, 32, None)[0] == "graphs"  # unknown card: nothing compiled


def test_decode_is_compiled_only_where_the_run_pays_it_back():
    # llava-1.5-7b at batch 1 on an H200: ~2.1 ms of small kernels a step against a ~30 s compile
    assert fg.decode_plan(13.5e9, 0.3e9, 32, 4800, steps=None)[0] == "compiled"  # run length unknown
    assert fg.decode_plan(13.5e9, 0.3e9, 32, 4800, steps=1_000_000)[0] == "compiled"
    how, why = fg.decode_plan(13.5e9, 0.3e9, 32, 4800, steps=8 * 32)  # 8 images, 32 new tokens each
    assert how == "graphs" and "would not pay back over this run's ~256 steps" in why
    assert fg.decode_plan(13.5e9, 57e9, 32, 4800, steps=10**9)[0] == "graphs"  # traffic-bound: never compiled


def test_follow_run_reaches_the_fast_generator_and_not_the_eager_path(tiny, monkeypatch):
    ms, model = tiny
    gen = fg.FastGenerator(model, prefill="eager")
    monkeypatch.setattr(fg, "generation_for", lambda lm: ("static+graphs", "why", gen))
    fg.follow_run(object(), 3 * 24, print)
    assert gen.expected_steps == 72 and gen.on_compile is print
    monkeypatch.setattr(fg, "generation_for", lambda lm: ("eager", "why", None))
    fg.follow_run(object(), 10)  # nothing to tell


def test_fast_generator_refuses_unknown_modes(tiny):
    with pytest.raises(ValueError, match="prefill must be one of"):
        fg.FastGenerator(tiny[1], prefill="all")


def test_a_failing_compile_falls_back_to_eager_blocks_and_says_why(tiny, monkeypatch):
    import torch

    from vlmlab.run import compiled_blocks as cb

    ms, model = tiny

    def broken_compile(fn):
        def wrapped(*a, **k):
            raise RuntimeError("inductor: no C++ compiler")
        return wrapped

    real = cb.compile_blocks
    monkeypatch.setattr(cb, "compile_blocks", lambda m: real(m, broken_compile))
    gen = fg.FastGenerator(model, prefill="blocks")
    inputs = tiny_inputs(ms, 2)
    kw = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    with torch.inference_mode():
        out = gen.generate(inputs, **kw)
        assert torch.equal(out, model.generate(**inputs, **kw))
    assert gen.blocks == [] and "compiled blocks failed (RuntimeError: inductor" in gen.fallbacks[0]
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in model.modules())
    with pytest.raises(RuntimeError, match="out of memory"):  # memory is not a compile problem: no retry
        monkeypatch.setattr(model, "generate", lambda **k: (_ for _ in ()).throw(RuntimeError("CUDA out of memory")))
        gen.generate(tiny_inputs(ms, 3), **kw)



@pytest.mark.parametrize("freeze,room,mode", [(True, True, "default"), (True, False, "default"), (False, True, "default"),
                                              (True, True, "max-autotune-no-cudagraphs")])
def test_a_compiled_decode_step_freezes_the_weights_where_they_fit_twice(tiny, monkeypatch, freeze, room, mode):
    """Freezing lets inductor fuse q+k+v and gate+up into one product each; it copies the weights, so
    only where free memory holds them, and not in an autotuning mode (frozen and autotuned was slower
    on the GPU); the compile mode's own options stay."""
    import torch

    ms, model = tiny
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    monkeypatch.setattr(fg, "FREEZE_WEIGHTS", freeze)
    monkeypatch.setattr(fg, "COMPILE_MODE", mode)
    gen = fg.FastGenerator(model, decode="compiled")
    assert not gen._room_to_freeze()  # the CPU: never
    monkeypatch.setattr(gen, "_room_to_freeze", lambda: room)
    gen._compiled()
    options = seen[-1]["options"]
    autotuned = mode != "default"
    assert options.get("freezing", False) == (freeze and room and not autotuned) == gen.frozen
    assert options.get("max_autotune", False) == (mode == "max-autotune-no-cudagraphs")
    assert "mode" not in seen[-1] and seen[-1]["dynamic"] is False


def test_inductors_global_autotuning_switches_freezing_off(tiny, monkeypatch):
    import torch
    import torch._inductor.config as inductor_config

    ms, model = tiny
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    monkeypatch.setattr(inductor_config, "coordinate_descent_tuning", True)
    gen = fg.FastGenerator(model, decode="compiled")
    monkeypatch.setattr(gen, "_room_to_freeze", lambda: True)
    gen._compiled()
    assert not gen.frozen


def test_a_frozen_step_is_traced_under_inductors_global_freezing_switch(tiny, monkeypatch):
    """dynamo reads ``torch._inductor.config.freezing`` itself while it traces (a GPU run with the
    switch only in the compile's options was not frozen: 189 tokens/s against 220), so the frozen
    step runs its calls under the global switch, and leaves it as it was."""
    import torch
    import torch._inductor.config as inductor_config

    ms, model = tiny
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: (lambda *a, **k: seen.append(inductor_config.freezing)))
    gen = fg.FastGenerator(model, decode="compiled")
    monkeypatch.setattr(gen, "_room_to_freeze", lambda: True)
    before = inductor_config.freezing
    gen._compiled()(1)
    assert seen == [True] and inductor_config.freezing == before
    unfrozen = fg.FastGenerator(model, decode="compiled")
    unfrozen._compiled()(1)
    assert seen == [True, before]
