"""``vlmlab.profile()``: one measured run — memory per device over time, latency per stage
(vision encode, prefill, decode per token) and per device, throughput, predicted vs measured peak.

``single`` and ``split`` run in this process; ``replicate`` and ``hybrid`` run one worker process
per replica, each profiling its own replica, merged into one Profile on one time axis (see
:mod:`vlmlab.observe.merge`). To compare strategies side by side, use ``vlmlab.bench()``.
"""
from __future__ import annotations


def profile(model=None, images=None, prompt: str | None = None, gpus=None, strategy: str = "single",
            dtype: str | None = None, batch_size: int = 8, max_new_tokens: int | None = None, device_map=None,
            gpus_per_replica: int | None = None, random_weights: bool = False, n_images: int = 16,
            progress: bool = True):
    """Profile captioning ``images`` (default: the bundled samples) with ``model`` (default: the
    bundled captioner), placed by ``strategy`` on ``gpus``. With ``random_weights=True`` the model is
    built with random weights and runs ``n_images`` caption-shaped prompts instead (no images, no
    download), then is unloaded. Returns a :class:`vlmlab.Profile`."""
    from vlmlab.run.caption import caption
    from vlmlab.plan.planner import _hardware, plan as make_plan
    from vlmlab.plan.plan import Plan

    if isinstance(model, Plan):
        p = model
    else:
        hw, _ = _hardware(gpus)
        dtype = dtype or ("float32" if hw.is_cpu else "bfloat16")
        p = make_plan(model, gpus=hw, strategy=strategy, dtype=dtype, batch_size=batch_size,
                      max_new_tokens=max_new_tokens or (32 if random_weights else 24), device_map=device_map,
                      gpus_per_replica=gpus_per_replica)
    if random_weights:
        return _random_weights_run(p, batch_size, max_new_tokens or p.max_new_tokens, n_images)
    from vlmlab.assets import SAMPLES_DIR

    result = caption(images if images is not None else SAMPLES_DIR, model=p, prompt=prompt,
                     batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress, profile=True)
    if result.profile is None:
        raise ValueError("nothing was captioned, so nothing was profiled: every input had an error "
                         f"({result.to_pandas()['error_kind'].value_counts().to_dict()})")
    return result.profile


def _random_weights_run(p, batch_size, max_new_tokens, n_images):
    from vlmlab.run.dry_run import synthetic_batch

    if p.runs_in_workers:
        from vlmlab.run.workers import run_replicas

        payloads = [min(batch_size, n_images - s) for s in range(0, n_images, batch_size)]
        _, stats = run_replicas(p, payloads, "vlmlab.run.dry_run:synthetic_batch",
                                {"batch_size": batch_size, "max_new_tokens": max_new_tokens},
                                load_kwargs={"random_weights": True}, profile=True)
        return stats.profile()
    from vlmlab.run.loading import load, unload
    from vlmlab.observe.profiler import Profiler

    lm = load(p, random_weights=True, force=True)
    try:
        with Profiler(lm, plan=p) as prof:
            rows = synthetic_batch(lm, n_images, batch_size=batch_size, max_new_tokens=max_new_tokens)
            prof.count_rows(rows)
        return prof.result()
    finally:
        unload(lm)
