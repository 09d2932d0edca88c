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
With ``out=`` every batch is appended to a :class:`~vlmlab.journal.Journal` (durable when the
append returns); a rerun with the same ``out`` skips the images already captioned. On Ctrl-C the
journal keeps the complete batches and the KeyboardInterrupt propagates.

Seam with ``vlmlab.workers`` (a plan with several replicas, ``replicate``/``hybrid``)::

    rows, stats = workers.run_replicas(plan, batches, "vlmlab.captioning:caption_items",
                                       {"prompt": ..., "max_new_tokens": ..., "batch_size": ...}, on_rows=sink)

``batches`` are lists of the :class:`~vlmlab.images.ImageItem` still to do (picklable). Each worker
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
from dataclasses import dataclass
from pathlib import Path

from .images import ImageError, ImageItem, collect, open_image
from .results import CaptionResult

#: Text of the user message per family (the chat template wraps it); the bundled captioner's own
#: prompt ("caption") overrides this for that model.
DEFAULT_PROMPTS = {
    "llava": "Describe this image in one sentence.",
    "llava_next": "Describe this image in one sentence.",
    "qwen2_vl": "Describe this image in one sentence.",
    "idefics3": "Describe this image in one sentence.",
    "internvl": "Describe this image in one sentence.",
    "paligemma": "caption en",  # no chat template: the processor adds the image tokens
    "blip2": "",  # plain image captioning: no prompt
}
FALLBACK_PROMPT = "Describe this image in one sentence."
TINY_PROMPT = "caption"  # the prompt scripts/train_captioner.py trained the bundled model on
TINY_MAX_NEW_TOKENS = 24  # its captions are six words
MAX_NEW_TOKENS = 64
#: the shipped sample scenes (``vlmlab.synth.save_samples``) and their reference ``captions.json``
SAMPLES_DIR = Path(__file__).resolve().parent / "samples"

#: error_kind values beyond images.ERROR_KINDS
RUN_ERROR_KINDS = {
    "oom": "out of memory even with one image per batch",
    "failed": "the model or processor raised an error on this image alone",
}


class JournalMismatchError(ValueError):
    """The ``out`` journal was written by another model or prompt; resuming would mix them."""


# ------------------------------------------------------------------------------------------ API
def caption(images, model=None, prompt: str | None = None, batch_size: int = 8, max_new_tokens: int | None = None,
            out=None, resume: bool = True, gpus=None, dtype: str | None = None, progress: bool = True,
            profile: bool = False) -> CaptionResult:
    """Caption ``images`` (a file, folder, list, PIL image or dataset: whatever
    :func:`vlmlab.images.collect` accepts) and return a :class:`CaptionResult`, one row per input.

    ``model``: None (the bundled captioner), a name or folder, a :class:`~vlmlab.plans.Plan` or a
    :class:`~vlmlab.loading.LoadedModel`. An already-loaded copy of the same model is reused; a
    model loaded here stays loaded (``vlmlab.unload()`` frees it). A plan with several replicas runs
    one worker process per replica (``vlmlab.workers``). ``gpus``/``dtype`` are used when the
    model has to be planned and loaded here.

    ``prompt``: the question (None: the family's default, "caption" for the bundled model).
    ``max_new_tokens``: None: 24 for the bundled captioner, 64 otherwise.
    ``out``: a JSONL journal appended after every batch; with ``resume=True`` a rerun skips images
    already captioned there (inputs that had an error are tried again). ``resume=False`` refuses an
    existing non-empty journal rather than overwrite it.
    ``profile=True`` attaches ``vlmlab.profiling`` measurements as ``result.profile``.
    """
    t_start = time.perf_counter()
    for label, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    if prompt is not None and not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    items = collect(images)
    target = _Target(model, gpus, dtype)
    if prompt is None:
        prompt = target.default_prompt()
    if max_new_tokens is None:
        max_new_tokens = target.default_max_new_tokens()

    journal, done = _open_journal(out, resume, target.name, prompt)
    todo = [it for it in items if it.key not in done]
    new_rows: list[dict] = []
    state = _State(limit=batch_size)
    result = CaptionResult([], target.name, prompt, None, str(out) if out is not None else None,
                           resumed=len(items) - len(todo), items={it.key: it for it in items})

    from tqdm.auto import tqdm

    bar = tqdm(total=len(items), initial=len(items) - len(todo), disable=not progress, unit="img",
               desc=f"caption {_short_name(target.name)}", dynamic_ncols=True)

    def sink(rows):  # one complete batch: journal first, then the in-memory result
        if journal is not None:
            journal.append([_journal_row(r, target.name, prompt) for r in rows])
        new_rows.extend(rows)
        bar.update(len(rows))

    try:
        if todo and target.replicas:
            result.oom_retries, result.profile = _run_replicas(target.plan, todo, prompt, max_new_tokens, batch_size,
                                                               sink, profile)
        elif todo:
            result.profile = _run_local(target, todo, prompt, max_new_tokens, batch_size, sink, state, profile)
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
    return result


def caption_batch(loaded_model, images: list, prompt: str | None, max_new_tokens: int | None) -> list[dict]:
    """Caption a list of RGB PIL images in one ``generate`` call: ``[{"caption", "n_tokens"}, ...]``.
    ``prompt`` / ``max_new_tokens`` None: the model's defaults (as in :func:`caption`).

    The only place that runs the model; worker processes call exactly this. Raises what the model
    raises (an out-of-memory error included): retrying is the caller's business.
    """
    import torch

    lm = loaded_model
    processor = lm.processor
    if processor is None:
        raise ValueError(f"{lm.name} has no processor (loaded with random_weights=True?): it cannot caption "
                         f"images. Load it with its weights, e.g. vlmlab.load({lm.name!r}).")
    if prompt is None or max_new_tokens is None:
        target = _Target(lm, None, None)
        prompt = target.default_prompt() if prompt is None else prompt
        max_new_tokens = target.default_max_new_tokens() if max_new_tokens is None else max_new_tokens
    text = build_prompt(processor, prompt)
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"  # decoder-only batching: the new tokens follow every prompt directly
    if getattr(tokenizer, "pad_token", "") is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token  # e.g. Llama tokenizers ship without one
    inputs = processor(images=list(images), text=[text] * len(images), return_tensors="pt", padding=True)
    inputs = inputs.to(lm.input_device)
    model_dtype = getattr(lm.model, "dtype", None)
    if model_dtype is not None and model_dtype.is_floating_point:
        for k, v in inputs.items():
            if torch.is_tensor(v) and v.is_floating_point():
                inputs[k] = v.to(model_dtype)
    gen = lm.model.generation_config
    pad = gen.pad_token_id if gen.pad_token_id is not None else tokenizer.pad_token_id
    with torch.inference_mode():
        output = lm.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                   pad_token_id=pad)
    new = output[:, inputs["input_ids"].shape[1]:].cpu()
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    eos = gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
    stop = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    return [{"caption": t.strip(), "n_tokens": _count_tokens(ids, stop, pad)} for t, ids in zip(texts, new.tolist())]


def caption_items(loaded_model, items: list[ImageItem], prompt: str | None = None, max_new_tokens: int | None = None,
                  batch_size: int | None = None, state=None) -> list[dict]:
    """Rows for ``items`` (one each, in order): open every image, caption the good ones with
    :func:`caption_batch` in batches of ``batch_size`` (default: all at once), halving on OOM.

    ``state`` (optional, an object with ``limit`` and ``oom_retries``) carries the largest batch
    known to fit from one call to the next and counts the OOM retries; without it, that is kept on
    ``loaded_model`` (so a worker process does not run out of memory again on every batch).
    """
    if state is None:
        state = loaded_model.__dict__.setdefault("_caption_state", _State(limit=sys.maxsize))
    if prompt is None or max_new_tokens is None:  # resolved once here, not per batch
        target = _Target(loaded_model, None, None)
        prompt = target.default_prompt() if prompt is None else prompt
        max_new_tokens = target.default_max_new_tokens() if max_new_tokens is None else max_new_tokens
    opened = _open_all(items)
    size = batch_size or max(len(opened), 1)
    rows = []
    for i in range(0, len(opened), size):
        rows += _caption_opened(loaded_model, opened[i:i + size], prompt, max_new_tokens, state)
    return rows


def build_prompt(processor, prompt: str) -> str:
    """The full text prompt for one image: the chat template around ``prompt``."""
    image_token = getattr(processor, "image_token", None)
    if image_token and image_token in prompt:
        return prompt  # already a complete prompt
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return prompt


# ------------------------------------------------------------------------------- model target
class _Target:
    """What ``model=`` names, resolved without loading anything until a batch needs it."""

    def __init__(self, model, gpus, dtype):
        from .loading import LoadedModel
        from .plans import Plan

        self.gpus, self.dtype = gpus, dtype
        self.lm = None
        self.plan = None
        self.model = model
        if isinstance(model, LoadedModel):
            if model.model is None:
                raise ValueError(f"{model.name} has been unloaded; load it again with vlmlab.load()")
            if dtype is not None and _canonical(dtype) != model.dtype:
                raise ValueError(f"{model.name} is loaded in {model.dtype}, not {dtype}; unload it and load "
                                 f"it in {dtype}, or leave dtype=None")
            self.lm, self.name, self._spec = model, model.name, model.plan._spec()
        elif isinstance(model, Plan):
            model.validate()
            self.plan, self.name, self._spec = model, model.model, model._spec()
        else:
            from .modelspec import spec

            self._spec = spec(model)
            self.name = self._spec.name

    @property
    def replicas(self) -> bool:
        return self.plan is not None and len(self.plan.replicas) > 1

    @property
    def is_tiny(self) -> bool:
        from .modelspec import DEFAULT_MODEL

        if self.name == DEFAULT_MODEL:
            return True
        path = getattr(self._spec, "path", None)
        try:
            return bool(path) and "vlmlab tiny-captioner" in Path(path, "README.md").read_text()[:2000]
        except OSError:
            return False

    def default_prompt(self) -> str:
        return TINY_PROMPT if self.is_tiny else DEFAULT_PROMPTS.get(self._spec.family.name, FALLBACK_PROMPT)

    def default_max_new_tokens(self) -> int:
        return TINY_MAX_NEW_TOKENS if self.is_tiny else MAX_NEW_TOKENS

    def prompt_text(self, prompt) -> str | None:
        if self.lm is None or self.lm.processor is None:
            return None
        return build_prompt(self.lm.processor, prompt)

    def get(self):
        """The LoadedModel: reuse a loaded copy, or load one now."""
        if self.lm is None:
            self.lm = self._find() or self._load()
        return self.lm

    def _find(self):
        from .loading import _path_of, _same_model, loaded

        path = _path_of(self._spec.path or self.name)
        for m in reversed(loaded()):
            if m.model is None or not _same_model(m, self.name, path):
                continue
            if self.plan is not None:
                if m.dtype == self.plan.dtype and dict(m.device_map) == dict(self.plan.replicas[0].device_map):
                    return m
                continue
            if self.dtype is not None and m.dtype != _canonical(self.dtype):
                continue
            if self.gpus is not None and not set(self._wanted_devices()) <= set(m.devices):
                continue
            return m
        return None

    def _wanted_devices(self) -> list:
        """The devices ``gpus`` asks for: indices, ["cpu"] for a CPU spec; a virtual GPU box matches nothing."""
        if isinstance(self.gpus, (list, tuple)):
            return list(self.gpus)
        from .hardware import gpus as get_gpus

        hw = get_gpus(self.gpus)
        if hw.is_cpu:
            return ["cpu"]
        return [g.device for g in hw] if hw.source != "virtual" else [object()]

    def _load(self):
        from .loading import load

        if self.plan is not None:
            return load(self.plan)
        return load(self.model, gpus=self.gpus, dtype=self.dtype)


def _canonical(dtype):
    from .memory import canonical_dtype

    return canonical_dtype(dtype)


# -------------------------------------------------------------------------------- local runs
@dataclass
class _State:
    limit: int  # the largest batch that is known (or hoped) to fit
    oom_retries: int = 0
    succeeded: bool = False  # any image captioned in this run (tells a bad image from a bad model)


def _run_local(target, todo, prompt, max_new_tokens, batch_size, sink, state, profile):
    chunks = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    prof = None
    with ExitStack() as stack:
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmlab-open"))
        pending = pool.submit(_open_all, chunks[0])  # open the next batch while this one generates
        stack.callback(lambda: pending.cancel())
        for i in range(len(chunks)):
            opened = pending.result()
            if i + 1 < len(chunks):
                pending = pool.submit(_open_all, chunks[i + 1])
            if target.lm is None and any(not isinstance(x, ImageError) for _, x in opened):
                target.get()  # loaded only once there is an image to caption
            if profile and prof is None and target.lm is not None:
                from .profiling import Profiler

                prof = stack.enter_context(Profiler(target.lm, plan=target.lm.plan))
            rows = _caption_opened(target.lm, opened, prompt, max_new_tokens, state)
            if prof is not None:
                prof.count_rows(rows)
            sink(rows)
    return prof.result() if prof is not None else None


def _open_all(items):
    out = []
    for it in items:
        try:
            out.append((it, open_image(it)))
        except ImageError as err:
            out.append((it, err))
    return out


def _caption_opened(lm, opened, prompt, max_new_tokens, state) -> list[dict]:
    rows: dict[int, dict] = {}
    good = []
    for i, (it, x) in enumerate(opened):
        if isinstance(x, ImageError):
            rows[i] = _row(it.key, error=x.message, error_kind=x.kind)
        else:
            good.append((i, it, x))
    device = _device_label(lm) if lm is not None else None
    pos, size = 0, max(1, min(state.limit, len(good) or 1))
    while pos < len(good):
        group = good[pos:pos + size]
        failure = None
        try:
            t0 = time.perf_counter()
            outs = caption_batch(lm, [im for _, _, im in group], prompt, max_new_tokens)
            ms = (time.perf_counter() - t0) * 1000 / len(group)
        except Exception as err:  # noqa: BLE001 - sorted out below; KeyboardInterrupt passes
            failure = (_is_oom(err), f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", err)
        if failure is None:
            state.succeeded = True
            for (i, it, _), o in zip(group, outs):
                rows[i] = _row(it.key, caption=o["caption"], n_tokens=o["n_tokens"], latency_ms=round(ms, 2),
                               batch_size=len(group), device=device)
            pos += len(group)
            continue
        oom, message, err = failure
        failure = None
        _free_memory(lm)
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
                           device=device)
            pos += 1
            continue
        if len(group) > 1:  # find the image(s) the model fails on: one at a time
            singles = _State(limit=1, succeeded=state.succeeded)
            part = _caption_opened(lm, [(it, im) for _, it, im in group], prompt, max_new_tokens, singles)
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
                       batch_size=1, device=device)
        pos += 1
    return [rows[i] for i in range(len(opened))]


def _row(key, caption=None, error=None, error_kind=None, n_tokens=0, latency_ms=None, batch_size=None,
         device=None) -> dict:
    return {"image": key, "caption": caption, "error": error, "error_kind": error_kind, "n_tokens": n_tokens,
            "latency_ms": latency_ms, "batch_size": batch_size, "device": device}


def _count_tokens(ids, stop, pad) -> int:
    n = 0
    for t in ids:
        if t in stop:
            break
        if t != pad:
            n += 1
    return n


def _is_oom(err) -> bool:
    import torch

    oom_type = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(err, oom_type) or (isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


def _free_memory(lm):
    import gc

    gc.collect()
    if lm is not None and any(isinstance(d, int) for d in lm.devices):
        import torch

        torch.cuda.empty_cache()


def _device_label(lm) -> str:
    return ",".join(f"cuda:{d}" if isinstance(d, int) else str(d) for d in lm.devices)


def _short_name(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


# ---------------------------------------------------------------------------- replicated runs
def _run_replicas(plan, todo, prompt, max_new_tokens, batch_size, sink, profile) -> tuple[int, object]:
    """Run on one worker process per replica; returns (how many batches ran smaller than asked,
    the merged Profile of the workers or None)."""
    from . import workers  # spawns processes: imported only for plans with several replicas

    payloads = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    rows, stats = workers.run_replicas(plan, payloads, "vlmlab.captioning:caption_items",
                                       {"prompt": prompt, "max_new_tokens": max_new_tokens, "batch_size": batch_size},
                                       on_rows=sink, profile=profile)
    # the retry count stays in the workers; their rows say which batches had to shrink
    by_key = {r["image"]: r for r in rows}
    smaller = 0
    for p in payloads:
        good = [by_key[it.key] for it in p if it.key in by_key and not by_key[it.key]["error"]]
        smaller += any(r["batch_size"] < len(good) for r in good) or any(
            by_key.get(it.key, {}).get("error_kind") == "oom" for it in p)
    return smaller, stats.profile()


# --------------------------------------------------------------------------------- journal
_META = ("model", "prompt")


def _journal_row(row, model, prompt) -> dict:
    out = {"key": row["image"], **{k: v for k, v in row.items() if k != "image"}}
    out.update(model=model, prompt=prompt)
    return out


def _result_row(jrow) -> dict:
    row = {"image": jrow["key"], **{k: v for k, v in jrow.items() if k not in ("key", *_META)}}
    for k in _row(None):
        row.setdefault(k, None)
    return row


def _open_journal(out, resume, model, prompt):
    """(Journal or None, {key: result row} of images already captioned there)."""
    if out is None:
        return None, {}
    from .journal import Journal

    journal = Journal(out)
    rows = journal.rows()
    if rows and not resume:
        raise FileExistsError(f"{out} already holds {len(rows)} caption row(s). vlmlab never overwrites a "
                              f"journal: delete it (or pick another out=) to start over, or pass resume=True to "
                              f"continue it.")
    others = {(r.get("model"), r.get("prompt")) for r in rows} - {(model, prompt)}
    if others:
        m, p = sorted(others, key=str)[0]
        raise JournalMismatchError(
            f"{out} holds captions from model {m!r} with prompt {p!r}; this run uses model {model!r} with "
            f"prompt {prompt!r}. Resuming would mix the two: pick another out= file, delete this one, or run "
            f"with the same model and prompt.")
    done = {}
    for r in rows:  # the last row of a key wins; keys that had an error are tried again
        done[r["key"]] = r
    return journal, {k: _result_row(r) for k, r in done.items() if not r.get("error")}

