"""The decode step replayed as a CUDA graph (vlmlab.run.graphed_step), on the CPU.

CUDA graphs need a GPU, so the capture itself is checked by benchmarks/gpu_smoke.py on one. Here:
the refusal off a GPU (the step still runs), and everything around the capture, with a stand-in
for the recording that keeps the real warm-up, counters and copy-in: the warm-up steps leave the
static cache as they found it, replays see each step's inputs, and the tokens equal generate's."""

from vlmlab.run import fast_generate as fg
from vlmlab.run import graphed_step as gs
from tests.conftest import CpuGraphedStep, tiny_inputs


def test_off_a_gpu_the_step_is_refused_and_still_runs():
    import torch

    calls = []

    def forward(**kw):
        calls.append(kw)
        return {"logits": kw["x"] * 2}

    step = gs.GraphedStep(forward, cache=None)
    out = step({"x": torch.ones(2), "use_cache": True})
    assert torch.equal(out["logits"], torch.full((2,), 2.0)) and len(calls) == 1
    assert "GPU" in step.failed and step.graph is None and step.replays == 0
    step({"x": torch.ones(2)})  # later steps go straight to the forward
    assert len(calls) == 2


def test_a_fallback_runs_the_steps_that_cannot_be_captured():
    import torch

    step = gs.GraphedStep(lambda **kw: "forward", cache=None, fallback=lambda **kw: "fallback")
    assert step({"x": torch.ones(1)}) == "fallback"
    refused = gs.GraphedStep(lambda **kw: "forward", cache=None)
    refused.refuse("the mask is built on the host")
    assert refused.failed == "the mask is built on the host"


def test_inputs_that_change_shape_or_kind_stop_the_replays():
    import torch

    step = CpuGraphedStep(lambda **kw: {"logits": kw["x"].sum()}, cache=None, fallback=lambda **kw: "fallback")
    assert step({"x": torch.ones(3), "n": 1})["logits"] == 3
    assert step({"x": torch.full((3,), 2.0), "n": 1})["logits"] == 6  # copied into the static input
    assert step.replays == 2
    assert step({"x": torch.ones(4), "n": 1}) == "fallback"  # grew: a graph has fixed shapes
    assert "changed shape" in step.failed and step.graph is None
    other = CpuGraphedStep(lambda **kw: {"logits": 0}, cache=None, fallback=lambda **kw: "fallback")
    other({"x": torch.ones(1), "n": 1})
    assert other({"x": torch.ones(1), "n": 2}) == "fallback" and "plain value" in other.failed


def test_python_side_cache_state_is_not_captured():
    import torch

    class Layer:
        def __init__(self):
            self.seen = 0

    class Cache:
        layers = [Layer()]

    cache = Cache()

    def forward(**kw):
        cache.layers[0].seen += 1  # a replay would never run this line
        return {"logits": kw["x"]}

    step = CpuGraphedStep(forward, cache, fallback=lambda **kw: "fallback")
    assert step({"x": torch.ones(1)}) == "fallback"
    assert "Python-side state" in step.failed


def test_warm_up_leaves_the_static_cache_as_it_was_and_tokens_equal_generate(tiny, made):
    import torch

    ms, model = tiny
    gen = fg.FastGenerator(model, prefill="eager", decode="graphs")
    kw = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}
    with torch.inference_mode():
        for seed in (0, 1):  # the second call reuses the cache and the captured step
            inputs = tiny_inputs(ms, 3, seed)
            assert torch.equal(gen.generate(inputs, **kw), model.generate(**inputs, **kw))
    assert len(made) == 1 and made[0].failed is None
    assert made[0].replays == 2 * 5  # every decode step after each call's prefill
    assert gen.decode_how == {(3, fg.cache_length(inputs["input_ids"].shape[1], 6)): "graphs"}
    assert gen.fallbacks == []


def test_every_tiny_family_decodes_through_the_graphed_step_to_generates_tokens(tiny_vlms, one_torch_thread, made):
    """Every family's decode step through the graphed step (warm-up, capture's stand-in, copy-in),
    or, where the step cannot be replayed, through its fallback: generate's tokens either way."""
    import torch
    from transformers import AutoModelForImageTextToText

    from tests.test_decode_loop import _batch

    kw = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False}
    replayed, refused = [], {}
    for family in sorted(tiny_vlms):
        model = AutoModelForImageTextToText.from_pretrained(tiny_vlms[family], dtype=torch.float32).eval()
        inputs = _batch(tiny_vlms[family], padded=False)
        gen = fg.FastGenerator(model, prefill="eager", decode="graphs")
        made.clear()
        with torch.inference_mode():
            fast = gen.generate(dict(inputs), **kw)
            plain = model.generate(**inputs, **kw)
        n = min(fast.shape[1], plain.shape[1])
        assert torch.equal(fast[:, :n], plain[:, :n]), family
        step = made[-1] if made else None
        if step is not None and step.failed is None and step.replays:
            replayed.append(family)
        else:
            refused[family] = step.failed if step is not None else "; ".join(gen.fallbacks)
    assert "llava" in replayed, refused  # the catalogue's llama-style families replay their step
    assert len(replayed) >= len(tiny_vlms) // 2, refused
