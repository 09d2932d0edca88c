"""Fixtures shared by several test modules."""
from __future__ import annotations

import pytest

from vlmlab.run import graphed_step as gs


@pytest.fixture(scope="module")
def lm():
    """One loaded bundled captioner for the module (calls in the module reuse it); unloaded after."""
    import vlmlab

    vlmlab.unload()
    model = vlmlab.load()
    yield model
    vlmlab.unload()


@pytest.fixture(scope="session")
def tiny_vlms(tmp_path_factory):
    """{family: folder} of every tiny model (tests/tiny_vlms.py), built once per test session."""
    from tests.tiny_vlms import build_all

    return build_all(tmp_path_factory.mktemp("tiny-vlms"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run faster on one thread, and far faster on a shared machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    """``(spec, model)``: the bundled captioner in float32 on the CPU, one per test module (tests
    patch its generate and compile its blocks, so modules do not share it)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from vlmlab.model.spec import spec

    ms = spec("vlmlab/tiny-captioner")
    model = AutoModelForImageTextToText.from_pretrained(ms.path, dtype=torch.float32).eval()
    return ms, model


def tiny_inputs(ms, batch=3, seed=0):
    """Caption-shaped inputs of ``batch`` rows for the tiny captioner (6 prompt tokens)."""
    from vlmlab.model.dummy_inputs import caption_inputs

    return caption_inputs(ms, batch, prompt_tokens=6, seed=seed)


# ---- the CUDA graph's recording, stood in for on the CPU (test_graphed_step, test_gqa_decode) --------

class _Replay:
    """The recording's stand-in: a replay runs the forward on the static inputs."""

    def __init__(self, step, static):
        self.step, self.static = step, static

    def replay(self):
        self.step._outputs = self.step.forward(**self.static, return_dict=True)


class CpuGraphedStep(gs.GraphedStep):
    """GraphedStep with the CUDA recording swapped for _Replay; warm-up and copy-in are its own."""

    def _capture(self, inputs):
        import torch

        static = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in inputs.items()}
        self._warm_up(static, gs._counters(self.cache), gs._numbers(self.cache))
        self.graph, self._static = _Replay(self, static), static


@pytest.fixture
def made(monkeypatch):
    """The GraphedSteps that fast_generate makes, each a CpuGraphedStep."""
    steps = []

    class Recording(CpuGraphedStep):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            steps.append(self)

    monkeypatch.setattr(gs, "GraphedStep", Recording)
    return steps
