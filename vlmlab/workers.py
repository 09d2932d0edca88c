"""One worker process per replica group: how ``replicate`` and ``hybrid`` plans run.

Threads do not scale here (two thread replicas on 2 H200s were slower than one GPU: the GIL and
one CUDA context serialise them); processes do. Workers are *spawned*, never forked — CUDA cannot
survive a fork, and the notebook kernel must not initialise CUDA before spawning.

Work is handed out in batches from one shared queue, so a faster replica simply takes more.
A worker that dies has its in-flight batch re-queued to the survivors and is reported; Ctrl-C
stops every worker and keeps what is done.

A *job* is ``"module:function"`` called in the worker as ``function(loaded_model, payload, **kwargs)``
and returning a list of row dicts; ``vlmlab.captioning:caption_items`` captions images and
``vlmlab.bench:synthetic_batch`` runs caption-shaped generates on random-weight models.
"""
from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import queue
import signal
import time
import traceback
from dataclasses import dataclass, field

POLL_S = 0.2


class WorkerError(RuntimeError):
    """Every worker died; ``rows`` holds what was finished before."""

    def __init__(self, message, rows=None):
        super().__init__(message)
        self.rows = rows or []


@dataclass
class RunStats:
    workers: int = 0
    load_s: dict = field(default_factory=dict)  # worker -> seconds to load its replica
    batches: dict = field(default_factory=dict)  # worker -> batches done
    died: dict = field(default_factory=dict)  # worker -> reason
    requeued: int = 0
    peaks: dict = field(default_factory=dict)  # device -> peak bytes seen by a worker (reserved + context)
    wall_s: float = 0.0
    busy_s: float = 0.0  # from the go signal (every worker loaded) to the last batch done
    warnings: list = field(default_factory=list)


def _resolve(job: str):
    module, _, name = job.partition(":")
    return getattr(importlib.import_module(module), name)


def _worker(wid, plan_json, job, job_kwargs, load_kwargs, tasks, results, go):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    try:
        from .loading import load
        from .plan import Plan

        plan = Plan.from_json(plan_json)
        devices = plan.replicas[wid].gpus
        if plan.hardware.is_cpu:
            import torch

            torch.set_num_threads(max(1, (os.cpu_count() or 1) // len(plan.replicas)))
        t0 = time.perf_counter()
        lm = load(plan, replica=wid, **load_kwargs)
        fn = _resolve(job)
        warmup = job_kwargs.pop("warmup", None)
        if warmup is not None:  # load kernels and allocator pools before the clock starts
            fn(lm, warmup, **job_kwargs)
        results.put(("ready", wid, time.perf_counter() - t0, os.getpid()))
        go.wait()
        while True:
            task = tasks.get()
            if task is None:
                break
            task_id, payload = task
            results.put(("start", wid, task_id))
            rows = fn(lm, payload, **job_kwargs)
            results.put(("done", wid, task_id, rows))
        results.put(("peaks", wid, _peaks(devices)))
    except BaseException:  # noqa: BLE001 - report anything, then die
        results.put(("error", wid, traceback.format_exc(limit=8)))
        raise SystemExit(1) from None


def _peaks(devices) -> dict:
    import sys

    if "torch" not in sys.modules:
        return {}
    import torch

    out = {}
    if torch.cuda.is_available():
        for d in devices:
            if isinstance(d, int):
                free, total = torch.cuda.mem_get_info(d)
                context = (total - free) - torch.cuda.memory_reserved(d)
                out[d] = torch.cuda.max_memory_reserved(d) + context
    return out


def run_replicas(plan, payloads: list, job: str, job_kwargs: dict | None = None, on_rows=None,
                 load_kwargs: dict | None = None, start_timeout: float = 600.0) -> tuple[list, RunStats]:
    """Run ``job`` over ``payloads`` (one batch each) on one spawned worker per replica of ``plan``.

    ``on_rows(rows)`` is called in this process as each batch finishes (journal, progress bar).
    Returns (rows in completion order, RunStats).
    """
    ctx = mp.get_context("spawn")
    tasks, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    for i, p in enumerate(payloads):
        tasks.put((i, p))
    plan_json = plan.to_json(indent=None)
    procs = {}
    for wid in range(len(plan.replicas)):
        procs[wid] = ctx.Process(target=_worker, name=f"vlmlab-replica-{wid}", daemon=True,
                                 args=(wid, plan_json, job, dict(job_kwargs or {}), load_kwargs or {}, tasks, results, go))
    stats = RunStats(workers=len(procs))
    rows_out: list = []
    done: set = set()
    inflight: dict = {}  # worker -> task id
    alive = set(procs)
    t0 = last_reap = time.perf_counter()
    t_go = None
    for p in procs.values():
        p.start()
    try:
        while len(done) < len(payloads):
            try:
                msg = results.get(timeout=POLL_S)
            except queue.Empty:
                msg = None
            if time.perf_counter() - last_reap >= POLL_S:
                last_reap = time.perf_counter()
                _reap(procs, alive, inflight, done, payloads, tasks, stats)
                if not alive:
                    raise WorkerError("every worker died: " + "; ".join(f"replica {w}: {r}" for w, r in stats.died.items()),
                                      rows_out)
                if t_go is None and alive <= set(stats.load_s):  # every survivor is loaded: start the clock
                    go.set()
                    t_go = time.perf_counter()
                if t_go is None and time.perf_counter() - t0 > start_timeout:
                    raise WorkerError(f"not every worker was ready after {start_timeout:.0f} s", rows_out)
            if msg is None:
                continue
            kind, wid = msg[0], msg[1]
            if kind == "ready":
                stats.load_s[wid] = msg[2]
            elif kind == "start":
                inflight[wid] = msg[2]
            elif kind == "done":
                inflight.pop(wid, None)
                if msg[2] not in done:
                    done.add(msg[2])
                    stats.batches[wid] = stats.batches.get(wid, 0) + 1
                    rows_out.extend(msg[3])
                    if on_rows is not None:
                        on_rows(msg[3])
            elif kind == "error":
                stats.died[wid] = msg[2].strip().splitlines()[-1]
                stats.warnings.append(f"replica {wid} failed:\n{msg[2]}")
        stats.busy_s = time.perf_counter() - (t_go or t0)
        for _ in procs:
            tasks.put(None)
        _collect_peaks(procs, results, stats)
    except KeyboardInterrupt:
        stats.warnings.append("interrupted: workers stopped, finished batches kept")
        raise
    finally:
        for p in procs.values():
            if p.is_alive():
                p.join(timeout=0 if len(done) < len(payloads) else 10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        stats.wall_s = time.perf_counter() - t0
    return rows_out, stats


def _reap(procs, alive, inflight, done, payloads, tasks, stats):
    """Notice dead workers; put their in-flight batch back on the queue for the survivors."""
    for wid in list(alive):
        p = procs[wid]
        if p.is_alive():
            continue
        alive.discard(wid)
        stats.died.setdefault(wid, f"exited with code {p.exitcode}")
        task_id = inflight.pop(wid, None)
        if task_id is not None and task_id not in done:
            tasks.put((task_id, payloads[task_id]))
            stats.requeued += 1
        stats.warnings.append(f"replica {wid} died ({stats.died[wid]}); "
                              f"{'its batch went back to the queue' if task_id is not None else 'it held no batch'}")


def _collect_peaks(procs, results, stats, timeout=30.0):
    waiting = {w for w, p in procs.items() if p.is_alive() or p.exitcode == 0}
    deadline = time.perf_counter() + timeout
    while waiting and time.perf_counter() < deadline:
        try:
            msg = results.get(timeout=POLL_S)
        except queue.Empty:
            waiting = {w for w in waiting if procs[w].is_alive()}
            continue
        if msg[0] == "peaks":
            waiting.discard(msg[1])
            for d, b in msg[2].items():
                stats.peaks[d] = max(stats.peaks.get(d, 0), b)


def run_in_process(lm, payloads: list, job: str, job_kwargs: dict | None = None, on_rows=None) -> tuple[list, RunStats]:
    """The same contract as :func:`run_replicas` for ``single`` and ``split`` plans: no worker."""
    fn, kwargs = _resolve(job), dict(job_kwargs or {})
    warmup = kwargs.pop("warmup", None)
    if warmup is not None:
        fn(lm, warmup, **kwargs)
    stats, rows_out = RunStats(workers=0), []
    t0 = time.perf_counter()
    for payload in payloads:
        rows = fn(lm, payload, **kwargs)
        rows_out.extend(rows)
        if on_rows is not None:
            on_rows(rows)
    stats.wall_s = stats.busy_s = time.perf_counter() - t0
    stats.batches[0] = len(payloads)
    stats.peaks = _peaks(lm.devices)
    return rows_out, stats
