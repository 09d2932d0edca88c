"""One worker process per replica group: how ``replicate`` and ``hybrid`` plans run.

Threads do not scale here (two thread replicas on 2 H200s were slower than one GPU: the GIL and
one CUDA context serialise them); processes do. Workers are *spawned*, never forked — CUDA cannot
survive a fork, and the notebook kernel must not initialise CUDA before spawning.

Work is handed out in batches from one queue, a batch to whichever worker asks next, so a faster
replica simply takes more.
A worker that dies has its in-flight batch re-queued to the survivors and is reported; Ctrl-C
stops every worker and keeps what is done.

A *job* is ``"module:function"`` called in the worker as ``function(loaded_model, payload, **kwargs)``
and returning a list of row dicts; ``vlmlab.run.batch:caption_items`` captions images and
``vlmlab.run.dry_run:synthetic_batch`` runs caption-shaped generates on random-weight models.
"""
from __future__ import annotations

import importlib
import multiprocessing as mp
import signal
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait

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
    profiles: dict = field(default_factory=dict)  # worker -> (Profile, its start on perf_counter), profile=True
    wall_s: float = 0.0
    busy_s: float = 0.0  # from the go signal (every worker loaded) to the last batch done
    worker_s: dict = field(default_factory=dict)  # worker -> seconds from the go signal to its last batch done
    worker_rows: dict = field(default_factory=dict)  # worker -> rows it returned
    go_at: float | None = None  # time.perf_counter() of the go signal
    warnings: list = field(default_factory=list)

    def profile(self):
        """The workers' profiles as one :class:`~vlmlab.Profile` (None without profile=True)."""
        if not self.profiles:
            return None
        from vlmlab.observe.merge import merge

        return merge(self.profiles, self.go_at, self.busy_s)


def _resolve(job: str):
    module, _, name = job.partition(":")
    return getattr(importlib.import_module(module), name)


def _worker(wid, plan_json, job, job_kwargs, load_kwargs, conn, profile=False):
    """Load replica ``wid``, then ask the parent for batches until it sends None. With ``profile``,
    a Profiler covers everything after the warm-up and its Profile goes back at the end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    try:
        from vlmlab.run.loading import load
        from vlmlab.plan.plan import Plan

        plan = Plan.from_json(plan_json)
        import torch

        from vlmlab.run.affinity import pin_worker

        # Each process would otherwise start one intra-op thread per core on any core: N workers
        # oversubscribe the host N times and delay each other's kernel-launching main thread.
        pin_worker(plan, wid)
        cuda = [g for g in plan.replicas[wid].gpus if getattr(plan.hardware.by_index(g), "kind", None) == "cuda"]
        if cuda:  # else a device-less CUDA call (synchronize, mem_get_info) opens a context on GPU 0
            torch.cuda.set_device(cuda[0])
        t0 = time.perf_counter()
        lm = load(plan, replica=wid, **load_kwargs)
        fn = _resolve(job)
        warmup = job_kwargs.pop("warmup", None)
        if warmup is not None:  # load kernels and allocator pools before the clock starts
            fn(lm, warmup, **job_kwargs)
        prof = None
        if profile:
            from vlmlab.observe.profiler import Profiler

            prof = Profiler(lm, plan=plan).__enter__().count(0, 0)  # a worker given no batch did 0 images
        conn.send(("ready", time.perf_counter() - t0))
        while (task := conn.recv()) is not None:
            task_id, payload = task
            rows = fn(lm, payload, **job_kwargs)
            if prof is not None:
                prof.count_rows(rows)
            conn.send(("done", task_id, rows))
        if prof is not None:
            prof.__exit__(None, None, None)
            conn.send(("profile", prof.result(), prof.started_at))
        conn.send(("peaks", _peaks(plan.replicas[wid].gpus)))
    except BaseException:  # noqa: BLE001 - report anything, then die
        try:
            conn.send(("error", traceback.format_exc(limit=8)))
        finally:
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


class _Pool:
    """The parent's side: one pipe per worker; batches go out one at a time to whoever asks, so the
    parent always knows which batch each worker holds (a worker's death loses nothing), and a worker
    killed mid-write can only break its own pipe."""

    def __init__(self, plan, payloads, job, job_kwargs, load_kwargs, on_rows=None, profile=False):
        ctx = mp.get_context("spawn")
        self.payloads, self.pending = payloads, deque(range(len(payloads)))
        self.conns, self.procs, self.inflight, self.done, self.idle = {}, {}, {}, set(), set()
        self.stats, self.rows, self.on_rows = RunStats(workers=len(plan.replicas)), [], on_rows
        plan_json = plan.to_json(indent=None)
        for wid in range(len(plan.replicas)):
            parent, child = ctx.Pipe()
            self.conns[wid] = parent
            self.procs[wid] = ctx.Process(target=_worker, name=f"vlmlab-replica-{wid}", daemon=True,
                                          args=(wid, plan_json, job, dict(job_kwargs or {}), load_kwargs or {}, child,
                                                profile))

    def give(self, wid):
        """Send ``wid`` its next batch; with none left while others still work, park it (a batch
        may yet come back from a worker that dies); with nothing left at all, tell it to stop."""
        task = self.pending.popleft() if self.pending else None
        if task is None and self.inflight:
            self.idle.add(wid)
            return
        self.idle.discard(wid)
        if task is not None:
            self.inflight[wid] = task
        try:
            self.conns[wid].send(None if task is None else (task, self.payloads[task]))
        except OSError:
            self.lost(wid, "its pipe closed")

    def lost(self, wid, reason):
        if wid not in self.conns:
            return
        del self.conns[wid]
        self.stats.died.setdefault(wid, reason)
        task = self.inflight.pop(wid, None)
        if task is not None and task not in self.done:
            self.pending.appendleft(task)
            self.stats.requeued += 1
        self.stats.warnings.append(f"replica {wid} died ({self.stats.died[wid]}); "
                                   f"{'its batch went back to the queue' if task is not None else 'it held no batch'}")
        self.idle.discard(wid)
        for other in list(self.idle):  # a parked survivor takes the requeued batch (or is told to stop)
            self.give(other)

    def handle(self, wid, msg):
        kind = msg[0]
        if kind == "ready":
            self.stats.load_s[wid] = msg[1]
        elif kind == "done":
            self.inflight.pop(wid, None)
            if msg[1] not in self.done:
                self.done.add(msg[1])
                self.stats.batches[wid] = self.stats.batches.get(wid, 0) + 1
                self.stats.worker_rows[wid] = self.stats.worker_rows.get(wid, 0) + len(msg[2])
                if self.stats.go_at is not None:
                    self.stats.worker_s[wid] = time.perf_counter() - self.stats.go_at
                self.rows.extend(msg[2])
                if self.on_rows is not None:
                    self.on_rows(msg[2])
            self.give(wid)
            if not self.inflight:
                for other in list(self.idle):  # all done: the parked ones can stop
                    self.give(other)
        elif kind == "profile":
            self.stats.profiles[wid] = (msg[1], msg[2])
        elif kind == "peaks":
            for d, b in msg[1].items():
                self.stats.peaks[d] = max(self.stats.peaks.get(d, 0), b)
            self.conns.pop(wid, None)
        elif kind == "error":
            self.stats.died[wid] = msg[1].strip().splitlines()[-1]
            self.stats.warnings.append(f"replica {wid} failed:\n{msg[1]}")

    def poll(self, timeout):
        """Wait for messages or deaths; returns False when nothing happened."""
        by_conn = {c: w for w, c in self.conns.items()}
        by_sentinel = {self.procs[w].sentinel: w for w in self.conns}
        ready = wait(list(by_conn) + list(by_sentinel), timeout=timeout)
        for r in ready:
            if r in by_conn and by_conn[r] in self.conns:
                wid = by_conn[r]
                try:
                    while wid in self.conns and self.conns[wid].poll():
                        self.handle(wid, self.conns[wid].recv())
                except (EOFError, OSError):
                    self.lost(wid, f"exited with code {self.procs[wid].exitcode}")
        for r in ready:
            wid = by_sentinel.get(r)
            if wid is not None and wid in self.conns:
                self.procs[wid].join(timeout=1)
                self.lost(wid, f"exited with code {self.procs[wid].exitcode}")
        return bool(ready)


def run_replicas(plan, payloads: list, job: str, job_kwargs: dict | None = None, on_rows=None,
                 load_kwargs: dict | None = None, start_timeout: float = 600.0,
                 profile: bool = False) -> tuple[list, RunStats]:
    """Run ``job`` over ``payloads`` (one batch each) on one spawned worker per replica of ``plan``.

    ``on_rows(rows)`` is called in this process as each batch finishes (journal, progress bar).
    ``profile``: every worker profiles its replica; ``stats.profile()`` merges them.
    Returns (rows in completion order, RunStats).
    """
    pool = _Pool(plan, payloads, job, job_kwargs, load_kwargs, on_rows, profile)
    t0 = time.perf_counter()
    t_go = None
    for p in pool.procs.values():
        p.start()
    try:
        while len(pool.done) < len(payloads):
            pool.poll(POLL_S)
            if not pool.conns and len(pool.done) < len(payloads):
                raise WorkerError("every worker died: " + "; ".join(
                    f"replica {w}: {r}" for w, r in pool.stats.died.items()), pool.rows)
            if t_go is None and set(pool.conns) <= set(pool.stats.load_s):  # all survivors loaded: go
                t_go = pool.stats.go_at = time.perf_counter()
                for wid in list(pool.conns):
                    pool.give(wid)
            if t_go is None and time.perf_counter() - t0 > start_timeout:
                raise WorkerError(f"not every worker was ready after {start_timeout:.0f} s", pool.rows)
        pool.stats.busy_s = time.perf_counter() - t_go
        deadline = time.perf_counter() + 30
        while pool.conns and time.perf_counter() < deadline:  # idle workers were told to stop: read their peaks
            pool.poll(POLL_S)
    except KeyboardInterrupt:
        pool.stats.warnings.append("interrupted: workers stopped, finished batches kept")
        raise
    finally:
        for p in pool.procs.values():
            p.join(timeout=5 if len(pool.done) == len(payloads) else 0)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        pool.stats.wall_s = time.perf_counter() - t0
    return pool.rows, pool.stats


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
    stats.worker_s[0], stats.worker_rows[0] = stats.busy_s, len(rows_out)
    stats.peaks = _peaks(lm.devices)
    return rows_out, stats
