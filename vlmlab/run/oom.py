"""Running out of GPU memory: telling it from other errors, and giving the memory back before a retry."""
from __future__ import annotations


def is_oom(err) -> bool:
    import torch

    oom_type = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(err, oom_type) or (isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


def free_memory(lm):
    import gc

    gc.collect()
    if lm is not None and any(isinstance(d, int) for d in lm.devices):
        import torch

        torch.cuda.empty_cache()
