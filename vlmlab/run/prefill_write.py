"""The prefill's write into a static KV cache as one slice copy per layer.

transformers' ``StaticLayer.update`` writes new keys and values with ``index_copy_`` at positions
it computes on the GPU, so that a compiled or captured decode step needs no number from the host.
For a decode step that is one row per sequence; for the prefill it is every prompt token of every
sequence, and ``index_copy_``'s kernel is slow at that size: 131 ms of the 2.76 s of kernels in a
prefill of 171 llava-1.5-7b prompts on an H200, about 0.8 TB/s (benchmarks/gpu_profile.py,
results/gpu_fast_path.txt). The prefill of an empty cache writes positions 0 to n-1, so the same
write is ``keys[:, :, :n].copy_(key_states)``. :func:`write_prefill_by_slice` makes each plain
static layer of a cache do that for its first update after the cache was made or reset, when that
update holds more than one token; every other update is transformers' own.
"""
from __future__ import annotations


def write_prefill_by_slice(cache) -> int:
    """Wrap the ``update`` and ``reset`` of each plain ``StaticLayer`` of ``cache`` (sliding-window
    and other layers keep their own); returns how many layers were wrapped."""
    wrapped = 0
    for layer in getattr(cache, "layers", []):
        if type(layer).__name__ != "StaticLayer" or "update" in vars(layer) or not hasattr(layer, "cumulative_length"):
            continue
        _wrap(layer)
        wrapped += 1
    return wrapped


def _wrap(layer) -> None:
    update, reset = layer.update, layer.reset
    layer._vlmlab_empty = True  # a bool: graphed_step reads Python numbers as cache state, not bools

    def reset_and_arm():
        reset()
        layer._vlmlab_empty = True

    def first_by_slice(key_states, value_states, *args, **kwargs):
        empty, layer._vlmlab_empty = layer._vlmlab_empty, False
        n = key_states.shape[-2]
        if not (empty and n > 1 and layer.is_initialized and n <= layer.keys.shape[-2]):
            return update(key_states, value_states, *args, **kwargs)
        layer.keys[:, :, :n].copy_(key_states)
        layer.values[:, :, :n].copy_(value_states)
        layer.cumulative_length.add_(n)  # where transformers' next update writes, as after its own
        return layer.keys, layer.values

    layer.update, layer.reset = first_by_slice, reset_and_arm
