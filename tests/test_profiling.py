"""Tests for vlmlab.observe (MemorySampler, Profiler, Profile) and its plots, on a tiny
random-weight LLaVA on the CPU. No timed assertions: only counts, structure and clean-up."""

import json
import subprocess
import sys
import threading
import time

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vlmlab.measure import plots as run_plots  # noqa: E402
from vlmlab.observe import plots  # noqa: E402
from vlmlab.observe.profiler import MemorySampler, Profile, Profiler, active_hooks, device_key  # noqa: E402

NEW_TOKENS = 4
N_LAYERS = 3
IMAGE_TOKEN = 127


def tiny_llava_config():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=128, max_position_embeddings=128)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                       vision_feature_layer=-2, image_seq_length=16)


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(tiny_llava_config()).eval()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    import vlmlab

    folder = tmp_path_factory.mktemp("tiny-llava")
    tiny_llava_config().save_pretrained(folder)
    lm = vlmlab.load(str(folder), random_weights=True, gpus="cpu")
    yield lm
    lm.unload()


def inputs(batch=2):
    ids = torch.tensor([[1] + [IMAGE_TOKEN] * 16 + [5, 6, 7]] * batch)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(batch, 3, 32, 32)}


def generate(model, batch=2):
    with torch.no_grad():
        return model.generate(**inputs(batch), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)


def n_hooks(model):
    """Forward hooks installed by vlmlab.observe (transformers installs some of its own lazily)."""
    return sum(getattr(h, "__module__", None) == "vlmlab.observe.hooks"
               for m in model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()))


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def sampler_threads():
    return [t for t in threading.enumerate() if t.name == "vlmlab-memory-sampler"]


# ---- import hygiene ------------------------------------------------------------------------------

def test_import_and_cpu_sampling_do_not_import_torch():
    code = ("import sys, time\n"
            "import vlmlab.observe.sampler as p\n"
            "assert 'torch' not in sys.modules, 'import'\n"
            "s = p.MemorySampler(['cpu', 0], interval=0.005).start()\n"
            "time.sleep(0.05)\n"
            "s.stop()\n"
            "rows = s.samples()\n"
            "assert rows and any(r['rss'] for r in rows), rows[:2]\n"
            "assert all(r['allocated'] is None for r in rows)\n"
            "assert 'torch' not in sys.modules, 'sampling'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- MemorySampler -----------------------------------------------------------------------------

def test_sampler_collects_and_stops():
    s = MemorySampler(["cpu"], interval=0.005).start()
    thread = s._thread
    assert s.running and thread.is_alive() and thread.daemon
    assert wait_for(lambda: s.ticks >= 3)
    s.stop()
    assert not s.running and not thread.is_alive()
    rows = s.samples()
    assert len(rows) >= 3
    assert set(rows[0]) == {"t", "device", "allocated", "reserved", "nvml_used", "rss"}
    assert all(r["device"] == "cpu" and r["rss"] > 0 for r in rows)
    assert [r["t"] for r in rows] == sorted(r["t"] for r in rows)
    n = len(rows)
    time.sleep(0.03)
    assert len(s.samples()) == n  # nothing after stop
    df = s.to_pandas()
    assert list(df.columns) == list(MemorySampler.FIELDS) and len(df) == n
    assert s.peaks()["cpu"]["rss"] == max(r["rss"] for r in rows)


def test_sampler_context_manager_and_restart():
    with MemorySampler("cpu", interval=0.005) as s:
        assert s.running
        thread = s._thread
        assert wait_for(lambda: s.ticks >= 2)
    assert not s.running and not thread.is_alive()
    s.start()
    assert s.running and s._thread is not thread
    s.stop()
    assert not s.running


def test_sampler_stop_without_join_and_forgotten_sampler():
    s = MemorySampler("cpu", interval=0.01).start()
    thread = s._thread
    assert wait_for(lambda: s.ticks >= 2)
    s.stop(join=False)  # returns at once; the thread samples no more and ends by itself
    n = s.ticks
    assert wait_for(lambda: not thread.is_alive())
    assert s.ticks == n and not s.running
    forgotten = MemorySampler("cpu", interval=0.01).start()
    thread = forgotten._thread
    del forgotten  # the thread holds it weakly: dropping it ends the thread
    assert wait_for(lambda: not thread.is_alive())


def test_ring_buffer_bound_holds():
    s = MemorySampler(["cpu", 0], interval=0.001, maxlen=5).start()
    try:
        assert wait_for(lambda: s.ticks > 20)
    finally:
        s.stop()
    rows = s.samples()
    assert len(s) == 5 and len(rows) == 10  # 5 ticks x 2 devices
    assert s.ticks > 20
    # a CUDA device without initialised CUDA: no torch counters, and CUDA stays uninitialised
    assert all(r["allocated"] is None and r["reserved"] is None for r in rows if r["device"] == 0)
    assert not torch.cuda.is_initialized()
    assert s.peaks()["cpu"]["rss"] >= max(r["rss"] for r in rows if r["device"] == "cpu")


def test_pause_resume():
    s = MemorySampler(["cpu"], interval=0.002).start()
    try:
        assert wait_for(lambda: s.ticks >= 2)
        s.pause()
        time.sleep(0.02)  # let a sample already under way finish
        n = s.ticks
        time.sleep(0.05)
        assert s.ticks == n and s.paused
        s.resume()
        assert wait_for(lambda: s.ticks > n)
    finally:
        s.stop()
    assert not s.running


def test_device_keys():
    assert device_key(0) == 0 and device_key("cuda:1") == 1 and device_key("GPU2") == 2
    assert device_key("cpu") == "cpu" and device_key(torch.device("cpu")) == "cpu"
    assert device_key(torch.device("cuda", 3)) == 3
    with pytest.raises(ValueError):
        MemorySampler([], interval=0.1)
    with pytest.raises(ValueError):
        MemorySampler(["cpu"], interval=0)


# ---- Profiler ----------------------------------------------------------------------------------

def test_stage_latencies_and_counts(model):
    before = n_hooks(model)
    with Profiler(model, interval=0.005) as prof:
        assert n_hooks(model) > before
        for _ in range(2):
            generate(model)
            prof.count(2, 2 * NEW_TOKENS)
    assert n_hooks(model) == before and active_hooks(model) == 0
    assert wait_for(lambda: not sampler_threads())  # the Profiler does not wait for it: gone within an interval
    p = prof.result()
    assert isinstance(p, Profile)
    lat = p.latency
    assert lat["vision encode"]["calls"] == 2
    assert lat["projector"]["calls"] == 2
    assert lat["prefill"]["calls"] == 2 and p.generate_calls == 2
    assert lat["decode"]["calls"] == 2 * (NEW_TOKENS - 1)
    for st in lat.values():
        assert st["mean_ms"] > 0 and st["p50_ms"] <= st["p95_ms"]
    # per device: everything ran on the CPU
    assert p.devices == ["cpu"]
    cpu = p.device_ms["cpu"]
    assert cpu["vision encode"]["vision"] > 0 and cpu["vision encode"]["projector"] > 0
    assert cpu["prefill"]["layers"] > 0 and cpu["decode"]["layers"] > 0
    assert cpu["prefill"]["head"] > 0 and cpu["decode"]["head"] > 0
    assert len(p.layer_ms) == N_LAYERS and all(ms > 0 for ms in p.layer_ms)
    assert p.forward_ms()["cpu"] <= p.wall_s * 1e3
    # throughput from count()
    assert p.images == 4 and p.tokens == 16
    assert p.images_per_s == pytest.approx(4 / p.wall_s)
    assert p.tokens_per_s == pytest.approx(16 / p.wall_s)
    # memory
    assert p.samples and p.peak()["cpu"] > 0 and p.peak_basis()["cpu"] == "rss"
    assert p.predicted == {} and p.error_pct() == {}
    assert prof.result() is p


def test_hooks_removed_after_exception(model):
    before = n_hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with Profiler(model, interval=0.005) as prof:
            generate(model)
            raise RuntimeError("boom")
    assert n_hooks(model) == before and active_hooks(model) == 0
    assert prof.result().latency["decode"]["calls"] == NEW_TOKENS - 1  # what ran before the exception
    with pytest.raises(Exception):
        with Profiler(model, interval=0.005):
            model.generate(input_ids=torch.tensor([[1, 2]]), pixel_values=torch.randn(1, 3, 7, 7), max_new_tokens=2)
    assert n_hooks(model) == before
    assert wait_for(lambda: not sampler_threads())


def test_nested_profilers_share_hooks(model):
    before = n_hooks(model)
    with Profiler(model, interval=0.005) as outer:
        installed = n_hooks(model)
        with pytest.raises(RuntimeError, match="already active"):
            outer.__enter__()
        generate(model)
        with Profiler(model, interval=0.005) as inner:
            assert n_hooks(model) == installed  # no double registration
            generate(model)
            inner.count(2, 2 * NEW_TOKENS)
        assert n_hooks(model) == installed  # the outer one still profiles
        generate(model)
    assert n_hooks(model) == before
    o, i = outer.result(), inner.result()
    assert o.latency["prefill"]["calls"] == 3 and o.latency["decode"]["calls"] == 3 * (NEW_TOKENS - 1)
    assert i.latency["prefill"]["calls"] == 1 and i.latency["decode"]["calls"] == NEW_TOKENS - 1
    assert i.latency["vision encode"]["calls"] == 1
    assert o.tokens is None and i.tokens == 2 * NEW_TOKENS
    assert sum(i.layer_ms) < sum(o.layer_ms)


def test_detail_devices_uses_fewer_hooks(model):
    before = n_hooks(model)
    with Profiler(model, interval=0.005, detail="layers"):
        per_layer = n_hooks(model) - before
    with Profiler(model, interval=0.005, detail="devices") as prof:
        # per layer: one pre hook each and one post hook on the last; per device run: one of each
        assert n_hooks(model) - before == per_layer - (N_LAYERS - 1)
        generate(model)
    assert n_hooks(model) == before
    p = prof.result()
    assert p.layer_ms == [] and p.device_ms["cpu"]["decode"]["layers"] > 0
    assert p.latency["decode"]["calls"] == NEW_TOKENS - 1


def test_layer_sampling_scales_decode_times(model):
    with Profiler(model, memory=False, layer_every=2) as prof:
        generate(model)
    p = prof.result()
    # 3 decode steps, the 1st and 3rd timed: layer times scaled by 3/2; stage counts unchanged
    assert p.latency["decode"]["calls"] == NEW_TOKENS - 1 and p.latency["prefill"]["calls"] == 1
    assert all(ms > 0 for ms in p.layer_ms) and p.device_ms["cpu"]["decode"]["layers"] > 0
    assert any("1 decode step in 2" in n for n in p.notes)
    with pytest.raises(ValueError):
        Profiler(model, layer_every=0)


def test_bare_module_with_roles(model):
    roles = {"vision": ["model.vision_tower"], "projector": ["model.multi_modal_projector"],
             "layers": ["model.language_model.layers"], "head": ["lm_head"]}
    with Profiler(model, roles=roles, memory=False) as prof:
        generate(model, batch=1)
    p = prof.result()
    assert p.samples == [] and p.latency["decode"]["calls"] == NEW_TOKENS - 1
    assert p.tokens is None and any("count()" in n for n in p.notes)
    no_config = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="roles"):
        Profiler(no_config).__enter__()
    assert n_hooks(no_config) == 0
    with pytest.raises(RuntimeError):
        Profiler(model).result()


def test_loaded_model_with_plan_is_json_serialisable(loaded):
    from vlmlab.run.loading import LoadedModel

    assert isinstance(loaded, LoadedModel)
    with Profiler(loaded, plan=loaded.plan, interval=0.005) as prof:  # the caption() interface
        generate(loaded.model)
        prof.count(2, 2 * NEW_TOKENS)
    p = prof.result()
    assert p.model == loaded.name
    assert set(p.predicted) == {"cpu"} and p.predicted["cpu"] == sum(loaded.plan.predicted().values())
    assert p.error_pct() == {}  # CPU memory is not predicted well enough to show an error (issue 14, item 18)
    d = json.loads(json.dumps(p.to_dict()))
    assert d["latency"]["decode"]["calls"] == NEW_TOKENS - 1
    assert d["predicted"]["cpu"] > 0 and d["peak"]["cpu"] > 0 and d["images"] == 2
    assert d["samples"] and d["samples"][0]["device"] == "cpu"
    assert len(d["calls"]["decode"]) == NEW_TOKENS - 1
    small = p.to_dict(samples=False, calls=False)
    assert "samples" not in small and "calls" not in small
    frames = p.to_pandas()
    assert set(frames) == {"memory", "calls", "latency", "devices", "layers", "summary"}
    assert len(frames["calls"]) == sum(len(v) for v in p.stages.values())
    assert frames["devices"].loc["cpu", "predicted"] == p.predicted["cpu"]
    assert len(frames["layers"]) == N_LAYERS


def test_repr_html_and_repr(model):
    with Profiler(model, interval=0.005) as prof:
        generate(model)
        prof.count(2, 8)
    p = prof.result()
    html = p._repr_html_()
    assert html.count("<img src='data:image/png;base64,") == 2
    assert "prefill" in html and "decode" in html and "tokens/s" in html
    assert "decode" in repr(p)


# ---- plots -------------------------------------------------------------------------------------

def _bars(fig):
    return [p for ax in fig.axes for p in ax.patches]


def test_memory_timeline_lines(model):
    from matplotlib.figure import Figure

    with Profiler(model, interval=0.005) as prof:
        generate(model)
    p = prof.result()
    fig = plots.memory_timeline(p.to_pandas()["memory"])
    assert isinstance(fig, Figure) and len(fig.axes[0].lines) == 1  # cpu: RSS only
    assert isinstance(p.plot_memory(), Figure)
    rows = [{"t": t, "device": d, "allocated": 1e9 + t, "reserved": 2e9, "nvml_used": 3e9, "rss": None}
            for t in (0.0, 0.1, 0.2) for d in (0, 1)]
    fig = plots.memory_timeline(rows)
    assert len(fig.axes[0].lines) == 4  # 2 devices x (allocated solid, reserved dashed)
    styles = sorted(line.get_linestyle() for line in fig.axes[0].lines)
    assert styles == ["-", "-", "--", "--"]
    assert len(plots.memory_timeline(rows, predicted={0: 5e9, 1: 5e9}).axes[0].lines) == 6
    assert isinstance(plots.memory_timeline([]), Figure)


def test_latency_breakdown_bars(model):
    with Profiler(model, interval=0.005) as prof:
        generate(model)
    p = prof.result()
    fig = plots.latency_breakdown(p)
    # 3 stages (vision encode, prefill, decode) x (1 device + "other")
    assert len(_bars(fig)) == 3 * 2
    assert len(_bars(p.plot_latency(per="total"))) == 6


def test_strategy_comparison_bars():
    import pandas as pd

    df = pd.DataFrame([
        {"strategy": s, "batch_size": b, "images_per_s": 10.0 * b / (i + 1), "p50_ms": 100.0 * (i + 1),
         "p95_ms": 150.0 * (i + 1), "peak_GPU0": 5e9, "peak_GPU1": 4e9}
        for i, s in enumerate(["single", "split", "replicate"]) for b in (1, 4, 16)
        if not (s == "split" and b == 16)])
    fig = run_plots.strategy_comparison(df)
    assert len(_bars(fig)) == 8
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["1", "4", "16"]
    assert len(_bars(run_plots.strategy_comparison(df, metric="p50_ms"))) == 8
    assert len(_bars(run_plots.strategy_comparison(df, metric="peak_GPU1"))) == 8


# ---- CUDA (skipped without a GPU; run on the device machine) --------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda_inputs(device, batch=2):
    return {k: v.to(device) for k, v in inputs(batch).items()}


@cuda
def test_cuda_loaded_model_single_gpu(tmp_path):
    import vlmlab

    tiny_llava_config().save_pretrained(tmp_path)
    lm = vlmlab.load(str(tmp_path), random_weights=True, gpus=[0])
    try:
        assert lm.devices == [0]
        before = n_hooks(lm.model)
        new_tokens = 150  # > 2 x 64 steps: completed events are resolved (and pooled) on the way
        with Profiler(lm, plan=lm.plan, interval=0.005) as prof:
            with torch.no_grad():
                lm.model.generate(**cuda_inputs(lm.input_device), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  do_sample=False)
            prof.count(2, 2 * new_tokens)
        assert n_hooks(lm.model) == before
        p = prof.result()
        assert p.devices == [0]
        assert p.latency["prefill"]["calls"] == 1 and p.latency["decode"]["calls"] == new_tokens - 1
        assert p.latency["vision encode"]["calls"] == 1
        assert all(ms > 0 for ms in p.layer_ms)
        assert 0 < p.forward_ms()[0] <= p.wall_s * 1e3
        for s in p.steps:
            assert 0 <= s["start"] <= s["end"] <= p.wall_s + 1e-3
        assert any(r["allocated"] for r in p.samples) and any(r["reserved"] for r in p.samples)
        assert p.peaks[0]["max_reserved"] > 0 and p.peak_basis()[0] in ("nvml_used", "max_reserved")
        assert set(p.predicted) == {0} and 0 in p.error_pct()
        json.dumps(p.to_dict())
        assert p._repr_html_().count("<img") == 2
        print("\n", p, p.error_pct(), p.peak_basis())
    finally:
        lm.unload()


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_cuda_split_over_two_gpus(model):
    import copy

    from accelerate import dispatch_model

    lm = "model.language_model"
    dm = {"model.vision_tower": 0, "model.multi_modal_projector": 0, f"{lm}.embed_tokens": 0, f"{lm}.rotary_emb": 0,
          f"{lm}.layers.0": 0, f"{lm}.layers.1": 1, f"{lm}.layers.2": 1, f"{lm}.norm": 1, "lm_head": 1}
    split = dispatch_model(copy.deepcopy(model), device_map=dm)
    before = n_hooks(split)
    with Profiler(split, interval=0.005) as prof:
        with torch.no_grad():
            split.generate(**cuda_inputs("cuda:0"), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        prof.count(2, 2 * NEW_TOKENS)
    assert n_hooks(split) == before
    p = prof.result()
    assert p.devices == [0, 1] and p.layer_devices == [0, 1, 1]
    assert p.device_ms[0]["vision encode"]["vision"] > 0 and p.device_ms[0]["decode"]["layers"] > 0
    assert p.device_ms[1]["decode"]["layers"] > 0 and p.device_ms[1]["decode"]["head"] > 0
    assert "vision encode" not in p.device_ms[1]
    assert p.latency["decode"]["calls"] == NEW_TOKENS - 1
    # a step starts on GPU0 and ends on GPU1: both on the host's time axis, in order
    for s in p.steps:
        assert s["start"] <= s["end"]
    assert {r["device"] for r in p.samples} == {0, 1}
    assert len(plots.latency_breakdown(p).axes[0].patches) == 3 * 3
    assert len(plots.memory_timeline(p.samples).axes[0].lines) == 4
    with Profiler(split, interval=0.005, detail="devices") as prof:
        with torch.no_grad():
            split.generate(**cuda_inputs("cuda:0"), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    q = prof.result()
    assert q.device_ms[0]["decode"]["layers"] > 0 and q.device_ms[1]["decode"]["layers"] > 0
    print("\n", p, {d: round(ms, 2) for d, ms in p.forward_ms().items()})


def test_default_detail_is_per_device_on_cuda_and_per_layer_on_cpu(model):
    from vlmlab.observe.profiler import auto_detail

    assert auto_detail(["cpu"]) == "layers"
    assert auto_detail([0]) == "devices"
    assert auto_detail([0, 1]) == "devices"
    with Profiler(model, interval=0.005) as prof:  # the CPU model of this file: every layer timed
        pass
    assert prof.detail == "layers"
