"""``vlmlab.caption()``: images in, captions out, in batches, resumable.

    result = vlmlab.caption("photos/", out="captions.jsonl")   # the bundled captioner on this machine
    result.to_pandas(); result                                  # a table; a thumbnail gallery

Path of one batch (``caption_batch``): the prompt is the processor's chat template applied to one
user message ``[{"type": "image"}, {"type": "text", "text": prompt}]`` with
``add_generation_prompt=True`` (a processor without a chat template gets the text as it is; a prompt
that already holds the processor's image token is used verbatim); the tokenizer pads on the left
(decoder-only batching); ``model.generate(..., do_sample=False, num_beams=1, max_new_tokens=...)``;
the new tokens are decoded with ``skip_special_tokens=True``.

Robustness: a broken input becomes a row with ``error`` / ``error_kind`` and the run goes on; an
out-of-memory batch is halved and retried down to one image (then the row gets kind ``"oom"``); an
image the model fails on is isolated by retrying its batch one image at a time (kind ``"failed"``).
With ``out=`` every batch is appended to a :class:`~vlmlab.run.journal.Journal` (durable when the
append returns); a rerun with the same ``out`` skips the images already captioned. On Ctrl-C the
journal keeps the complete batches and the KeyboardInterrupt propagates.

Seam with ``vlmlab.run.workers`` (a plan with several replicas, ``replicate``/``hybrid``)::

    rows, stats = workers.run_replicas(plan, batches, "vlmlab.run.batch:caption_items",
                                       {"prompt": ..., "max_new_tokens": ..., "batch_size": ...}, on_rows=sink)

``batches`` are lists of the :class:`~vlmlab.run.images.ImageItem` still to do (picklable). Each worker
process loads its replica and calls :func:`caption_items` per batch (it opens the images and calls
:func:`caption_batch`, the only model call, halving on OOM; the batch size that fits is remembered
on the worker's LoadedModel). ``on_rows(rows)`` runs in this process once per *complete* batch: the
journal and the progress bar live here. Ctrl-C: ``run_replicas`` stops its workers and re-raises.
"""
from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

from vlmlab.run.batch import BatchState, caption_opened, crashed_rows, open_all, prepare_images
from vlmlab.run.images import ImageError, collect
from vlmlab.run.journal import JournalMismatchError, journal_row, open_caption_journal  # noqa: F401  re-exported
from vlmlab.run.results import CaptionResult
from vlmlab.run.target import ModelTarget


# ------------------------------------------------------------------------------------------ API
def caption(images, model=None, prompt: str | None = None, batch_size: int = 8, max_new_tokens: int | None = None,
            out=None, resume: bool = True, gpus=None, dtype: str | None = None, progress: bool = True,
            profile: bool = False) -> CaptionResult:
    """Caption ``images`` (a file, folder, list, PIL image or dataset: whatever
    :func:`vlmlab.run.images.collect` accepts) and return a :class:`CaptionResult`, one row per input.

    ``model``: None (the bundled captioner), a name or folder, a :class:`~vlmlab.plan.plan.Plan` or a
    :class:`~vlmlab.run.loading.LoadedModel`. An already-loaded copy of the same model is reused; a
    model loaded here stays loaded (``vlmlab.unload()`` frees it). A plan with several replicas runs
    one worker process per replica (``vlmlab.run.workers``). ``gpus``/``dtype`` are used when the
    model has to be planned and loaded here.

    ``prompt``: the question (None: the family's default, "caption" for the bundled model).
    ``max_new_tokens``: None: 24 for the bundled captioner, 64 otherwise.
    ``out``: a JSONL journal appended after every batch; with ``resume=True`` a rerun skips images
    already captioned there (inputs that had an error are tried again). ``resume=False`` refuses an
    existing non-empty journal rather than overwrite it.
    ``profile=True`` attaches ``vlmlab.observe`` measurements as ``result.profile``.
    """
    t_start = time.perf_counter()
    for label, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    if prompt is not None and not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    items = collect(images)
    target = ModelTarget(model, gpus, dtype)
    if prompt is None:
        prompt = target.default_prompt()
    if max_new_tokens is None:
        max_new_tokens = target.default_max_new_tokens()
    target.check_context(prompt, max_new_tokens)

    journal, done = open_caption_journal(out, resume, target.name, prompt)
    todo = [it for it in items if it.key not in done]
    new_rows: list[dict] = []
    state = BatchState(limit=batch_size)
    result = CaptionResult([], target.name, prompt, None, str(out) if out is not None else None,
                           resumed=len(items) - len(todo), items={it.key: it for it in items})

    from tqdm.auto import tqdm

    bar = tqdm(total=len(items), initial=len(items) - len(todo), disable=not progress, unit="img",
               desc=f"caption {_short_name(target.name)}", dynamic_ncols=True)

    def sink(rows):  # one complete batch: journal first, then the in-memory result
        if journal is not None:
            journal.append([journal_row(r, target.name, prompt) for r in rows])
        new_rows.extend(rows)
        bar.update(len(rows))

    try:
        if todo and target.replicas:
            def phase(text):  # what the workers are doing while they start
                bar.set_description_str(f"caption {_short_name(target.name)}" + (f": {text}" if text else ""))

            result.oom_retries, result.profile, result.warnings = _run_replicas(
                target.plan, todo, prompt, max_new_tokens, batch_size, sink, profile, phase)
        elif todo:
            result.profile = _run_local(target, todo, prompt, max_new_tokens, batch_size, sink, state, profile,
                                        note=lambda text: bar.set_postfix_str(text, refresh=True))
            result.oom_retries = state.oom_retries
    except KeyboardInterrupt:
        bar.close()
        n_done = len(items) - len(todo) + len(new_rows)
        where = (f"; {out} holds them: rerun with the same out= to resume" if journal is not None
                 else "; pass out='captions.jsonl' to make a run resumable")
        print(f"vlmlab.caption interrupted after {n_done} of {len(items)} image(s){where}", file=sys.stderr)
        raise
    finally:
        bar.close()
        if journal is not None:
            journal.close()

    by_key = {r["image"]: r for r in new_rows}
    result.rows = [by_key.get(it.key) or done[it.key] for it in items]
    result.prompt_text = target.prompt_text(prompt)
    result.elapsed_s = time.perf_counter() - t_start
    for warning in result.warnings:  # a worker that died or hung is said on screen, not only in the result
        print(f"vlmlab.caption: {warning}", file=sys.stderr)
    return result


# -------------------------------------------------------------------------------- local runs
def _run_local(target, todo, prompt, max_new_tokens, batch_size, sink, state, profile, note=None):
    chunks = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    prof = None
    with ExitStack() as stack:
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmlab-open"))
        def ahead(chunk):  # open (and, once the model is loaded, process) the next batch while this one generates
            opened = open_all(chunk)
            return opened, prepare_images(target.lm, opened, prompt, state.limit)

        pending = pool.submit(ahead, chunks[0])
        stack.callback(lambda: pending.cancel())
        for i in range(len(chunks)):
            opened, prepared = pending.result()
            if target.lm is None and any(not isinstance(x, ImageError) for _, x in opened):
                target.get()  # loaded only once there is an image to caption
            if i + 1 < len(chunks):
                pending = pool.submit(ahead, chunks[i + 1])
            if note is not None and target.lm is not None:  # compiling a shape shows in the progress bar
                from vlmlab.run.fast_generate import follow_run

                follow_run(target.lm, len(chunks) * max_new_tokens, note)
                note = None
            if profile and prof is None and target.lm is not None:
                from vlmlab.observe.profiler import Profiler

                prof = stack.enter_context(Profiler(target.lm, plan=target.lm.plan))
            rows = caption_opened(target.lm, opened, prompt, max_new_tokens, state, prepared)
            if prof is not None:
                prof.count_rows(rows)
            sink(rows)
    return prof.result() if prof is not None else None


def _short_name(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


# ---------------------------------------------------------------------------- replicated runs
def _run_replicas(plan, todo, prompt, max_new_tokens, batch_size, sink, profile, on_phase=None):
    """Run on one worker process per replica; returns (how many batches ran smaller than asked,
    the merged Profile of the workers or None, one line per worker that died or stopped answering)."""
    from vlmlab.run import workers  # spawns processes: imported only for plans with several replicas

    step = min(batch_size, -(-len(todo) // len(plan.replicas)))  # too few images for full batches: every replica gets some
    payloads = [todo[i:i + step] for i in range(0, len(todo), step)]
    rows, stats = workers.run_replicas(plan, payloads, "vlmlab.run.batch:caption_items",
                                       {"prompt": prompt, "max_new_tokens": max_new_tokens, "batch_size": batch_size},
                                       on_rows=sink, profile=profile, isolate=crashed_rows, on_phase=on_phase)
    # the retry count stays in the workers; their rows say which batches had to shrink
    by_key = {r["image"]: r for r in rows}
    smaller = 0
    for p in payloads:
        good = [by_key[it.key] for it in p if it.key in by_key and not by_key[it.key]["error"]]
        smaller += any(r["batch_size"] < len(good) for r in good) or any(
            by_key.get(it.key, {}).get("error_kind") == "oom" for it in p)
    return smaller, stats.profile(), list(stats.notices)
