"""A decode step replayed as one CUDA graph, captured from the model's own forward.

A decode step launches hundreds of kernels (every layer's projections, norms, rotary, cache
writes, attention). Launched one by one from Python, the host bounds the step at small and
middling batches (~0.9 ms of host work per layer on an H200 host). Captured once as a CUDA
graph and replayed, a step costs the host one call. Unlike ``torch.compile(mode=
"reduce-overhead")`` this compiles nothing: the forward's own kernels (eager, or a forward
compiled without CUDA graphs) are recorded in the time of a few steps, and a replay checks no
guards.

``GraphedStep`` keeps static copies of the step's tensor inputs; each call copies the new
inputs in and replays. The graph writes the static KV cache in place, so it is bound to that
cache object (``StaticCache.reset`` keeps its tensors, so a reset cache still serves).

Warm-up steps run before the capture (lazy initialisation, cuBLAS workspaces and compiles must
not happen inside it). They write the next position's keys and values, which the real step then
writes again identically, and they advance the cache layers' step counters
(``cumulative_length``), which are put back. A step whose cache keeps Python-side state (a number
that a replay would not advance) is not captured.
"""
from __future__ import annotations

import time

WARMUP_STEPS = 2
#: tensors of a cache layer up to this size are counters, saved before and restored after warm-up
_COUNTER_NUMEL = 64


class NotCapturable(Exception):
    """This step cannot be replayed from the captured graph."""


class GraphedStep:
    """``step(inputs) -> outputs``: ``forward(**inputs, return_dict=True)`` replayed as a CUDA
    graph captured at the first call. If a step cannot be captured, ``failed`` says why and every
    later step runs ``fallback`` (default: ``forward`` as it is)."""

    def __init__(self, forward, cache, fallback=None):
        self.forward, self.cache, self.fallback = forward, cache, fallback
        self.graph = None
        self.failed: str | None = None
        self.capture_s = 0.0  # warm-up and capture of the first call
        self.replays = 0
        self._static: dict | None = None
        self._outputs = None

    def refuse(self, why: str) -> None:
        """Do not capture (the caller knows the step syncs with the host, say)."""
        if self.graph is None and self.failed is None:
            self.failed = why

    def __call__(self, inputs: dict):
        if self.failed is None:
            try:
                if self.graph is None:
                    self._capture(inputs)
                else:
                    self._copy_in(inputs)
            except Exception as err:  # noqa: BLE001 - any failure to capture means: run the step as it is
                self.failed = f"{type(err).__name__}: {str(err)[:200]}"
                self.graph = self._static = self._outputs = None
            else:
                self.graph.replay()
                self.replays += 1
                return self._outputs
        return (self.fallback or self.forward)(**inputs, return_dict=True)

    def _copy_in(self, inputs: dict) -> None:
        import torch

        if inputs.keys() != self._static.keys():
            raise NotCapturable(f"the step's inputs changed from {sorted(self._static)} to {sorted(inputs)}")
        for name, value in inputs.items():
            kept = self._static[name]
            if torch.is_tensor(value):
                if not (torch.is_tensor(kept) and kept.shape == value.shape and kept.dtype == value.dtype
                        and kept.device == value.device):
                    raise NotCapturable(f"input {name!r} changed shape, type or device")
                if value is not kept:
                    kept.copy_(value, non_blocking=True)
            elif not (value is kept or (_plain(value) and value == kept)):
                raise NotCapturable(f"input {name!r} is {type(value).__name__}, not a tensor or a plain value")

    def _capture(self, inputs: dict) -> None:
        import torch

        device = next((v.device for v in inputs.values() if torch.is_tensor(v)), None)
        if device is None or device.type != "cuda":
            raise NotCapturable("CUDA graphs need the step's inputs on a GPU")
        for name, value in inputs.items():
            if not (torch.is_tensor(value) or _plain(value) or value is self.cache):
                raise NotCapturable(f"input {name!r} is {type(value).__name__}, not a tensor or a plain value")
        t0 = time.perf_counter()
        static = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in inputs.items()}
        counters, numbers = _counters(self.cache), _numbers(self.cache)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        try:
            with torch.cuda.stream(stream):
                self._warm_up(static, counters, numbers)
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the processor's prefetch thread may copy the next batch to the GPU meanwhile
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                outputs = self.forward(**static, return_dict=True)
        finally:
            torch.cuda.current_stream(device).wait_stream(stream)
            _restore(counters)
        self.graph, self._static, self._outputs = graph, static, outputs
        self.capture_s = time.perf_counter() - t0

    def _warm_up(self, static: dict, counters: list, numbers: list) -> None:
        """Run the step ``WARMUP_STEPS`` times on ``static``, each time putting the cache's counters
        back, so that the real step after the capture is the next one."""
        for _ in range(WARMUP_STEPS):
            self.forward(**static, return_dict=True)
            _restore(counters)
            if _numbers(self.cache) != numbers:
                raise NotCapturable("the cache keeps Python-side state that a replay would not advance")


def _plain(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _layers(cache) -> list:
    return list(getattr(cache, "layers", None) or [])


def _counters(cache) -> list:
    """``(tensor, saved copy)`` for every small tensor of the cache's layers (their step counters)."""
    import torch

    return [(t, t.clone()) for layer in _layers(cache) for t in vars(layer).values()
            if torch.is_tensor(t) and t.numel() <= _COUNTER_NUMEL]


def _restore(counters) -> None:
    for tensor, saved in counters:
        tensor.copy_(saved)


def _numbers(cache) -> list:
    """The cache layers' Python numbers: a replay cannot advance them."""
    return [(i, k, v) for i, layer in enumerate(_layers(cache)) for k, v in vars(layer).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)]
