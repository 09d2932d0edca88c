"""``vlmlab.bench()``: the same work under each strategy and batch size, side by side.

Each (strategy, batch size) is planned, loaded (in this process for ``single``/``split``, one
spawned worker per replica for ``replicate``/``hybrid``), warmed up, then timed on the same
images: images/s, tokens/s, batch latency p50/p95, and measured vs predicted peak per device.
With ``random_weights=True`` the work is caption-shaped ``generate`` calls on a random-weight
model (a fixed number of new tokens), so a 7B model's strategies compare before any download.
"""
from __future__ import annotations

import html
import time
from dataclasses import dataclass, field

from vlmlab.run.fast_generate import even_batches

GiB = 1024**3
MIN_BATCHES_PER_REPLICA = 4  # fewer, and start-up and the last uneven batch decide the numbers


@dataclass
class BenchResult:
    rows: list = field(default_factory=list)  # one dict per (strategy, batch size)
    plans: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)  # runs too short to mean much, and the like

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def plot(self, metric: str = "images_per_s", ax=None):
        from vlmlab.measure.plots import strategy_comparison

        return strategy_comparison(self.to_pandas(), metric=metric, ax=ax)

    def to_dict(self):
        return {"rows": self.rows}

    def __repr__(self):
        notes = "".join(f"\nnote: {w}" for w in self.warnings)
        return f"BenchResult({len(self.rows)} runs)\n" + self.to_pandas().to_string(index=False) + notes

    def _repr_html_(self):
        import base64
        import io

        df = self.to_pandas()
        keep = [c for c in ("strategy", "batch_size", "replicas", "generation", "images", "images_per_s", "tokens_per_s",
                            "p50_ms", "p95_ms", "prefill_tflops", "decode_gbs", "peak_gib", "predicted_gib", "error_pct")
                if c in df.columns]
        table = df[keep].to_html(index=False, float_format=lambda v: f"{v:.2f}")
        img = ""
        try:
            buf = io.BytesIO()
            self.plot().savefig(buf, format="png", dpi=80, bbox_inches="tight")
            img = f"<img src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'/>"
        except Exception as err:  # noqa: BLE001 - a table without a picture beats no table
            img = f"<p>(no plot: {html.escape(str(err))})</p>"
        notes = "".join(f"<li>{html.escape(w)}</li>" for w in self.warnings)
        return f"<div class='vlmlab-bench'>{table}{img}{'<ul>' + notes + '</ul>' if notes else ''}</div>"


def bench(model=None, strategies=("single", "replicate"), batch_sizes=None, gpus=None, images=None, n_images=None,
          max_new_tokens: int | None = None, dtype: str | None = None, random_weights: bool = False,
          prompt: str | None = None, progress: bool = True, isolate: bool | None = None,
          image_size=None) -> BenchResult:
    """Run the same images (default: the bundled samples) under each strategy and batch size.

    ``isolate=True`` runs ``single`` and ``split`` in a worker process too, so this process never
    holds GPU memory and each run's measured peaks are its own. ``None`` (the default): on CPU
    devices, or when any strategy runs workers anyway, so every run starts alike in a fresh process
    (an in-process run on cores that other processes share is not comparable with workers).

    ``batch_sizes``: None (or "auto" among them): the planner's batch, the largest that fits with
    headroom (8 on the CPU), evened out over the images so the last batch is not mostly padding.

    Rows say which generation path ran (``generation``: "static+graphs" or "eager", and why), how
    each shape decodes (``decode``), the cost of each shape's first call (``compile_s``, of which
    ``capture_s`` captured the decode graph), ``fallbacks``, ``fused_norms`` and ``fast_rotary``; with ``random_weights`` and one
    replica in this process, also the achieved prefill TFLOP/s and decode GB/s and their share of
    the card's peak (``vlmlab.observe.roofline``). ``image_size`` (width, height): the image the
    plan and the random-weight inputs assume (the planner's photo-sized default otherwise)."""
    from tqdm.auto import tqdm

    from vlmlab.plan.planner import _hardware, plan as make_plan

    hw, _ = _hardware(gpus)
    dtype = dtype or ("float32" if hw.is_cpu else "bfloat16")
    max_new_tokens = max_new_tokens or (32 if random_weights else 24)
    if random_weights:
        items = None
        n = n_images or 64
    else:
        from vlmlab.run.images import collect

        items = collect(images if images is not None else _samples())
        n = len(items)
    if isolate is None:
        isolate = hw.is_cpu or any(s in ("replicate", "hybrid", "auto") for s in strategies)
    result = BenchResult()
    runs = [(s, b) for s in strategies for b in (batch_sizes or ("auto",))]
    bar = tqdm(runs, desc="bench", disable=not progress)
    for strategy, batch_size in bar:
        bar.set_postfix_str(f"{strategy} b{batch_size}")
        p = make_plan(model, gpus=hw, strategy=strategy, dtype=dtype, batch_size=batch_size, max_new_tokens=max_new_tokens,
                      image_size=image_size)
        result.plans[(strategy, batch_size)] = p
        size = even_batches(n, p.batch_size) if batch_size == "auto" else batch_size
        note = (lambda text, label=f"{strategy} b{size}": bar.set_postfix_str(f"{label}: {text}", refresh=True))
        row = _run_one(p, items, n, size, max_new_tokens, random_weights, prompt, isolate, note)
        if p.batch_note:
            row["batch_note"] = p.batch_note
        result.rows.append(row)
        batch_size = size
        batches = -(-n // batch_size)
        if batches < MIN_BATCHES_PER_REPLICA * len(p.replicas):
            result.warnings.append(
                f"{p.strategy} at batch {batch_size}: {n} images make {batches} batch(es) for {len(p.replicas)} "
                f"replica(s), too short to mean much (start-up and the last batch dominate); use at least "
                f"{MIN_BATCHES_PER_REPLICA * len(p.replicas) * batch_size} images")
    return result


def _run_one(p, items, n, batch_size, max_new_tokens, random_weights, prompt, isolate=False, note=None) -> dict:
    import numpy as np

    from vlmlab.run import workers
    from vlmlab.run.fast_generate import follow_run, generation_for

    if random_weights:
        per_batch = [min(batch_size, n - s) for s in range(0, n, batch_size)]
        payloads, job = per_batch, "vlmlab.run.dry_run:synthetic_batch"
        kwargs = {"batch_size": batch_size, "max_new_tokens": max_new_tokens, "warmup": batch_size}  # a full batch: kernels and allocator pools at steady state
    else:
        from vlmlab.run.target import ModelTarget  # the same defaults caption() uses for this model

        target = ModelTarget(p, None, None)
        prompt = prompt or target.default_prompt()
        payloads = [items[s:s + batch_size] for s in range(0, n, batch_size)]
        job = "vlmlab.run.batch:caption_items"
        kwargs = {"prompt": prompt, "max_new_tokens": max_new_tokens, "batch_size": batch_size, "warmup": items[:1]}
    t0, extra = time.perf_counter(), {}
    if p.runs_in_workers or isolate:
        rows, stats = workers.run_replicas(p, payloads, job, kwargs, load_kwargs={"random_weights": random_weights})
        extra["wall_s"] = time.perf_counter() - t0
        extra["generation"] = rows[0].get("generation") if rows else None
    else:
        from vlmlab.run.loading import load, unload

        lm = load(p, random_weights=random_weights, force=True)
        mode, reason, fast = generation_for(lm)
        follow_run(lm, (len(payloads) + 1) * max_new_tokens, note)  # the warm-up batch, then the timed ones
        _reset_peaks(lm.devices)
        try:
            rows, stats = workers.run_in_process(lm, payloads, job, kwargs)
            extra.update(wall_s=time.perf_counter() - t0, generation=mode, generation_reason=reason,
                         compile_s=sum(fast.compile_s.values()) if fast is not None else 0.0)
            if fast is not None:
                extra.update(decode=sorted(set(fast.decode_choice.values())), compiled_blocks=fast.blocks,
                             capture_s=sum(fast.capture_s.values()), fallbacks=fast.fallbacks,
                             fused_norms=lm.model.__dict__.get("_vlmlab_fused_norms", []),
                             fast_rotary=lm.model.__dict__.get("_vlmlab_fast_rotary", []))
            if random_weights and rows and stats.busy_s:
                extra.update(_rates(lm, p, batch_size, max_new_tokens, rows, mode))
        finally:
            unload(lm)
    lat = [r.get("batch_latency_ms", r.get("latency_ms")) for r in rows if r.get("latency_ms") is not None]
    tokens = sum(r.get("n_tokens") or 0 for r in rows)
    predicted = p.predicted(batch_size)  # at the batch that ran (the planner's, evened out)
    out = {"strategy": p.strategy, "batch_size": batch_size, "replicas": len(p.replicas),
           "gpus": ",".join(str(g) for r in p.replicas for g in r.gpus), "images": len(rows),
           "seconds": stats.busy_s, "images_per_s": len(rows) / stats.busy_s if stats.busy_s else float("nan"),
           "tokens_per_s": tokens / stats.busy_s if stats.busy_s else float("nan"),
           "p50_ms": float(np.percentile(lat, 50)) if lat else float("nan"),
           "p95_ms": float(np.percentile(lat, 95)) if lat else float("nan"),
           "errors": sum(1 for r in rows if r.get("error")), "died": len(stats.died),
           "in_worker": p.runs_in_workers or isolate,
           "steady_images_per_s": sum(stats.worker_rows[w] / stats.worker_s[w] for w in stats.worker_s if stats.worker_s[w]),
           "load_s": max(stats.load_s.values(), default=float("nan")),
           "batches_per_worker": ",".join(str(stats.batches[w]) for w in sorted(stats.batches))}
    out.update(extra)
    if stats.peaks:
        worst = max(stats.peaks, key=lambda d: stats.peaks[d] / predicted.get(d, 1))
        out.update(peak_gib=stats.peaks[worst] / GiB, predicted_gib=predicted.get(worst, 0) / GiB,
                   error_pct=100 * (predicted.get(worst, 0) - stats.peaks[worst]) / stats.peaks[worst],
                   peaks={str(d): b for d, b in stats.peaks.items()},
                   predicted={str(d): b for d, b in predicted.items()})
    return out


def _rates(lm, p, batch_size, max_new_tokens, rows, mode) -> dict:
    """Achieved prefill TFLOP/s and decode GB/s: a prefill-only call of the run's shape is timed,
    and the rest of the median batch is decode."""
    import numpy as np

    from vlmlab.observe.roofline import achieved
    from vlmlab.run.dry_run import prefill_seconds
    from vlmlab.run.fast_generate import STATIC, cache_length

    prefill_s, prompt = prefill_seconds(lm, batch_size)
    batch_s = float(np.percentile([r["batch_latency_ms"] for r in rows], 50)) / 1000
    decode_step_s = (batch_s - prefill_s) / (max_new_tokens - 1) if max_new_tokens > 1 and batch_s > prefill_s else None
    kv = cache_length(prompt, max_new_tokens) if mode == STATIC else prompt + max_new_tokens // 2
    gpu = p.hardware.by_index(p.replicas[0].gpus[0]) if p.replicas[0].gpus else None
    return {"prefill_s": prefill_s, "decode_step_ms": 1000 * decode_step_s if decode_step_s else None,
            **achieved(p._spec(), gpu, batch=batch_size, prompt_tokens=prompt, prefill_s=prefill_s,
                       decode_step_s=decode_step_s, kv_tokens=kv, dtype=p.dtype)}


def _reset_peaks(devices):
    import torch

    for d in devices:
        if isinstance(d, int):
            torch.cuda.reset_peak_memory_stats(d)


def _samples():
    from vlmlab.assets import SAMPLES_DIR

    return SAMPLES_DIR
