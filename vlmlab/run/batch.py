"""One batch through the model: open the images, caption the good ones in one ``generate`` call,
halve the batch on out-of-memory, isolate an image the model fails on. ``caption_items`` is the job
that worker processes run (``vlmlab.run.batch:caption_items``); ``caption_batch`` is the only model call."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from vlmlab.run.images import ImageError, ImageItem, open_image
from vlmlab.run.oom import free_memory, is_oom
from vlmlab.run.prompts import caption_inputs, tokenizer_of
from vlmlab.run.target import ModelTarget, random_copy_message

#: error_kind values beyond images.ERROR_KINDS
RUN_ERROR_KINDS = {
    "oom": "out of memory even with one image per batch",
    "failed": "the model or processor raised an error on this image alone",
    "crashed": "the worker process died (or stopped answering) twice on this image alone",
}


def caption_batch(loaded_model, images: list, prompt: str | None, max_new_tokens: int | None,
                  prepared: dict | None = None) -> list[dict]:
    """Caption a list of RGB PIL images in one ``generate`` call: ``[{"caption", "n_tokens", "tokens"}, ...]``
    (``tokens``: the generated ids up to the first stop token).
    ``prompt`` / ``max_new_tokens`` None: the model's defaults (as in :func:`caption`).
    ``prepared``: :func:`prepare_inputs` of exactly these images and prompt, made ahead (in another
    thread, while the previous batch generated).

    The only place that runs the model; worker processes call exactly this. Raises what the model
    raises (an out-of-memory error included): retrying is the caller's business.
    """
    import torch

    lm = loaded_model
    processor = lm.processor
    if processor is None:
        raise ValueError(random_copy_message(lm))
    if prompt is None or max_new_tokens is None:
        target = ModelTarget(lm, None, None)
        prompt = target.default_prompt() if prompt is None else prompt
        max_new_tokens = target.default_max_new_tokens() if max_new_tokens is None else max_new_tokens
    from vlmlab.run.decode_loop import without_sync
    from vlmlab.run.fast_generate import generation_for

    _, _, fast = generation_for(lm)
    n = len(images)
    if prepared is None or prepared["images"] != [id(im) for im in images] or prepared["prompt"] != prompt:
        prepared = prepare_inputs(lm, images, prompt)
    inputs = prepared["inputs"].to(lm.input_device)
    tokenizer = tokenizer_of(processor)
    model_dtype = getattr(lm.model, "dtype", None)
    if model_dtype is not None and model_dtype.is_floating_point:
        for k, v in inputs.items():
            if torch.is_tensor(v) and v.is_floating_point():
                inputs[k] = v.to(model_dtype)
    gen = lm.model.generation_config
    pad = gen.pad_token_id if gen.pad_token_id is not None else tokenizer.pad_token_id
    kw = dict(do_sample=False, num_beams=1, pad_token_id=pad)
    with torch.inference_mode():
        if fast is not None:
            output = fast.generate(inputs, max_new_tokens, **kw)
        else:
            output = lm.model.generate(**inputs, max_new_tokens=max_new_tokens, **without_sync(lm.model, kw))
    new = output[:n, inputs["input_ids"].shape[1]:].cpu()
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    eos = gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
    stop = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    return [{"caption": t.strip(), "n_tokens": _count_tokens(ids, stop, pad), "tokens": _until_stop(ids, stop)}
            for t, ids in zip(texts, new.tolist())]


def prepare_inputs(lm, images: list, prompt: str) -> dict:
    """The processor's CPU tensors for ``images`` (padded to the fast path's compiled batch with
    copies of the last image), with what they were made from; safe to call from another thread."""
    import threading

    from vlmlab.run.fast_generate import generation_for, padded_size

    _, _, fast = generation_for(lm)
    padded = list(images)
    if fast is not None:  # pad a short batch to the compiled shape with copies of its last image
        padded += [images[-1]] * (padded_size(len(images), fast.batch_size) - len(images))
    with lm.__dict__.setdefault("_processor_lock", threading.Lock()):  # fast tokenizers are not re-entrant
        inputs = caption_inputs(lm.processor, padded, prompt)
    return {"images": [id(im) for im in images], "prompt": prompt, "inputs": inputs}


def prepare_images(lm, opened, prompt, limit) -> dict | None:
    """:func:`prepare_inputs` for the good images of ``opened`` when they make one batch (at most
    ``limit``); None otherwise or if the processor fails (the batch then finds out why itself)."""
    good = [x for _, x in opened if not isinstance(x, ImageError)]
    if lm is None or lm.processor is None or not good or len(good) > limit:
        return None
    try:
        return prepare_inputs(lm, good, prompt)
    except Exception:  # noqa: BLE001 - caption_batch processes them again and reports the error per image
        return None


def caption_items(loaded_model, items: list[ImageItem], prompt: str | None = None, max_new_tokens: int | None = None,
                  batch_size: int | None = None, state=None) -> list[dict]:
    """Rows for ``items`` (one each, in order): open every image, caption the good ones with
    :func:`caption_batch` in batches of ``batch_size`` (default: all at once), halving on OOM.

    ``state`` (optional, an object with ``limit`` and ``oom_retries``) carries the largest batch
    known to fit from one call to the next and counts the OOM retries; without it, that is kept on
    ``loaded_model`` (so a worker process does not run out of memory again on every batch).
    """
    if state is None:
        state = loaded_model.__dict__.setdefault("_caption_state", BatchState(limit=sys.maxsize))
    if prompt is None or max_new_tokens is None:  # resolved once here, not per batch
        target = ModelTarget(loaded_model, None, None)
        prompt = target.default_prompt() if prompt is None else prompt
        max_new_tokens = target.default_max_new_tokens() if max_new_tokens is None else max_new_tokens
    from concurrent.futures import ThreadPoolExecutor

    opened = open_all(items)
    size = batch_size or max(len(opened), 1)
    groups = [opened[i:i + size] for i in range(0, len(opened), size)]
    rows = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmlab-prepare") as pool:
        pending = None
        for i, group in enumerate(groups):  # the next batch is processed while this one generates
            prepared = pending.result() if pending is not None else None
            pending = (pool.submit(prepare_images, loaded_model, groups[i + 1], prompt, state.limit)
                       if i + 1 < len(groups) else None)
            rows += caption_opened(loaded_model, group, prompt, max_new_tokens, state, prepared)
    return rows


@dataclass
class BatchState:
    limit: int  # the largest batch that is known (or hoped) to fit
    oom_retries: int = 0
    succeeded: bool = False  # any image captioned in this run (tells a bad image from a bad model)


def open_all(items):
    out = []
    for it in items:
        try:
            out.append((it, open_image(it)))
        except ImageError as err:
            out.append((it, err))
    return out


def caption_opened(lm, opened, prompt, max_new_tokens, state, prepared: dict | None = None) -> list[dict]:
    """Rows for ``opened`` ((item, image or ImageError) pairs); ``prepared``: the processor's inputs
    for all its good images as one batch (:func:`prepare_images`), used if that batch is tried whole."""
    rows: dict[int, dict] = {}
    good = []
    for i, (it, x) in enumerate(opened):
        if isinstance(x, ImageError):
            rows[i] = _row(it.key, error=x.message, error_kind=x.kind)
        else:
            good.append((i, it, x))
    device = _device_label(lm) if lm is not None else None
    replica = getattr(lm, "replica", None)
    pos, size = 0, max(1, min(state.limit, len(good) or 1))
    while pos < len(good):
        group = good[pos:pos + size]
        failure = None
        try:
            t0 = time.perf_counter()
            outs = caption_batch(lm, [im for _, _, im in group], prompt, max_new_tokens, prepared)
            ms = (time.perf_counter() - t0) * 1000 / len(group)
        except Exception as err:  # noqa: BLE001 - sorted out below; KeyboardInterrupt passes
            failure = (is_oom(err), f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", err)
        if failure is None:
            state.succeeded = True
            for (i, it, _), o in zip(group, outs):
                rows[i] = _row(it.key, caption=o["caption"], n_tokens=o["n_tokens"], latency_ms=round(ms, 2),
                               batch_size=len(group), device=device, replica=replica)
            pos += len(group)
            continue
        oom, message, err = failure
        failure = None
        free_memory(lm)
        if oom and size > 1:
            size = max(1, size // 2)
            state.limit = size
            state.oom_retries += 1
            continue
        if oom:
            i, it, _ = group[0]
            rows[i] = _row(it.key, error=f"{it.key}: out of memory even with one image per batch ({message}). "
                                         f"Use a smaller max_new_tokens, a lower-precision dtype, or a plan with "
                                         f"more memory (strategy='split').", error_kind="oom", batch_size=1,
                           device=device, replica=replica)
            pos += 1
            continue
        if len(group) > 1:  # find the image(s) the model fails on: one at a time
            singles = BatchState(limit=1, succeeded=state.succeeded)
            part = caption_opened(lm, [(it, im) for _, it, im in group], prompt, max_new_tokens, singles)
            state.oom_retries += singles.oom_retries
            state.succeeded = singles.succeeded
            if not state.succeeded:
                raise err  # every image fails and none ever worked: the model, not the images
            for (i, _, _), r in zip(group, part):
                rows[i] = r
            pos += len(group)
            continue
        if not state.succeeded:
            raise err
        i, it, _ = group[0]
        rows[i] = _row(it.key, error=f"{it.key}: the model failed on this image ({message}).", error_kind="failed",
                       batch_size=1, device=device, replica=replica)
        pos += 1
    return [rows[i] for i in range(len(opened))]


def _row(key, caption=None, error=None, error_kind=None, n_tokens=0, latency_ms=None, batch_size=None,
         device=None, replica=None) -> dict:
    return {"image": key, "caption": caption, "error": error, "error_kind": error_kind, "n_tokens": n_tokens,
            "latency_ms": latency_ms, "batch_size": batch_size, "device": device, "replica": replica}


def crashed_rows(items, reason) -> list[dict]:
    """Error rows for images on which a worker process died twice (``run_replicas``' ``isolate``)."""
    return [_row(it.key, error=f"{it.key}: the worker process captioning it died twice ({reason}); the image was "
                 "set aside so the others could finish. Check it (a decoder crash?) or caption it alone.",
                 error_kind="crashed", batch_size=1) for it in items]


def _until_stop(ids, stop) -> list[int]:
    """The generated ids up to (not including) the first stop token."""
    for n, t in enumerate(ids):
        if t in stop:
            return ids[:n]
    return ids


def _count_tokens(ids, stop, pad) -> int:
    n = 0
    for t in ids:
        if t in stop:
            break
        if t != pad:
            n += 1
    return n


def _device_label(lm) -> str:
    return ",".join(f"cuda:{d}" if isinstance(d, int) else str(d) for d in lm.devices)
