"""Dry runs: caption-shaped ``generate`` calls on a (random-weight) model with dummy inputs, so a
big model's memory and speed can be measured before its weights are downloaded. Workers run
``vlmlab.run.dry_run:synthetic_batch`` as their job; ``bench`` and ``profile`` use it in-process."""
from __future__ import annotations

import time


def synthetic_batch(lm, n_images: int, batch_size: int = 1, max_new_tokens: int = 32, prompt_tokens: int = 16) -> list[dict]:
    """Caption-shaped ``generate`` over ``n_images`` in batches; one row per image; a batch that
    runs out of memory is halved and tried again. On the fast
    path (``vlmlab.run.fast_generate``) a batch smaller than the compiled one is padded up to it."""
    import torch

    from vlmlab.model.dummy_inputs import caption_inputs
    from vlmlab.run.oom import free_memory, is_oom
    from vlmlab.run.decode_loop import without_sync
    from vlmlab.run.fast_generate import generation_for, padded_size

    spec, rows = lm.plan._spec(), []
    dtype = getattr(torch, lm.dtype) if lm.dtype in ("float32", "bfloat16", "float16") else torch.bfloat16
    mode, _, fast = generation_for(lm)
    kw = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)
    start, size = 0, batch_size
    while start < n_images:
        n = min(size, n_images - start)
        run = padded_size(n, fast.batch_size) if fast is not None else n
        inputs = caption_inputs(spec, run, prompt_tokens, device=lm.input_device, dtype=dtype, seed=start)
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                out = fast.generate(inputs, **kw) if fast is not None else lm.model.generate(**inputs, **without_sync(lm.model, kw))
            if lm.input_device.startswith("cuda"):
                torch.cuda.synchronize(lm.input_device)
        except Exception as err:  # noqa: BLE001 - out of memory: halve the batch and go on, as caption() does
            if not is_oom(err) or n == 1:
                raise
            del inputs
            free_memory(lm)
            size = max(1, n // 2)
            continue
        ms = 1000 * (time.perf_counter() - t0)
        new = out.shape[1] - inputs["input_ids"].shape[1]
        rows += [{"image": f"synthetic:{start + i}", "caption": "", "error": None, "n_tokens": int(new),
                  "latency_ms": ms, "batch_latency_ms": ms, "device": str(lm.devices), "batch_size": n,
                  "generation": mode} for i in range(n)]
        start += n
    return rows


def prefill_seconds(lm, batch_size: int, prompt_tokens: int = 16, repeats: int = 2) -> tuple[float, int]:
    """(seconds of the fastest of ``repeats`` prefill-only calls at ``batch_size``, prompt length in
    tokens): a ``generate`` of one new token, on the same path and cache shape as the run's."""
    rows = [synthetic_batch(lm, batch_size, batch_size, max_new_tokens=1, prompt_tokens=prompt_tokens)
            for _ in range(repeats)]
    from vlmlab.model.dummy_inputs import caption_inputs

    length = caption_inputs(lm.plan._spec(), 1, prompt_tokens)["input_ids"].shape[1]
    return min(r[0]["batch_latency_ms"] for r in rows) / 1000, int(length)
