"""Dry runs: caption-shaped ``generate`` calls on a (random-weight) model with dummy inputs, so a
big model's memory and speed can be measured before its weights are downloaded. Workers run
``vlmlab.run.dry_run:synthetic_batch`` as their job; ``bench`` and ``profile`` use it in-process."""
from __future__ import annotations

import time


def synthetic_batch(lm, n_images: int, batch_size: int = 1, max_new_tokens: int = 32, prompt_tokens: int = 16) -> list[dict]:
    """Caption-shaped ``generate`` over ``n_images`` in batches; one row per image."""
    import torch

    from vlmlab.model.dummy_inputs import caption_inputs

    spec, rows = lm.plan._spec(), []
    dtype = getattr(torch, lm.dtype) if lm.dtype in ("float32", "bfloat16", "float16") else torch.bfloat16
    for start in range(0, n_images, batch_size):
        n = min(batch_size, n_images - start)
        inputs = caption_inputs(spec, n, prompt_tokens, device=lm.input_device, dtype=dtype, seed=start)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = lm.model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)
        if lm.input_device.startswith("cuda"):
            torch.cuda.synchronize(lm.input_device)
        ms = 1000 * (time.perf_counter() - t0)
        new = out.shape[1] - inputs["input_ids"].shape[1]
        rows += [{"image": f"synthetic:{start + i}", "caption": "", "error": None, "n_tokens": int(new),
                  "latency_ms": ms, "batch_latency_ms": ms, "device": str(lm.devices), "batch_size": n} for i in range(n)]
    return rows
