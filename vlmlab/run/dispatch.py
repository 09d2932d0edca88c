"""A replicated run, whatever carries its messages: the parent's queue of batches
(:class:`Dispatcher`, :func:`drive`) and a replica's side of it (:class:`ReplicaJob`).

Two transports use them: spawned worker processes on this host (``vlmlab.run.workers``) and Ray
actors on a cluster's nodes (``vlmlab.run.ray_backend``). So the rules are the same on both:
batches go out one at a time to whichever worker is free (a faster replica simply takes more);
the parent always knows which batch each worker holds, so a worker that dies loses nothing (its
batch goes back to the queue for the survivors); the first result of a batch is the only one kept,
so every batch counts exactly once; ``on_rows`` (journal, progress bar) runs in the parent once
per finished batch; Ctrl-C stops every worker and keeps what is done.

A *job* is ``"module:function"`` called in the worker as ``function(loaded_model, payload, **kwargs)``
and returning a list of row dicts; ``vlmlab.run.batch:caption_items`` captions images and
``vlmlab.run.dry_run:synthetic_batch`` runs caption-shaped generates on random-weight models.
"""
from __future__ import annotations

import importlib
import time
from collections import deque
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


def resolve(job: str):
    module, _, name = job.partition(":")
    return getattr(importlib.import_module(module), name)


# ---------------------------------------------------------------------------- the worker's side
class ReplicaJob:
    """Replica ``wid`` of ``plan`` in this process: load it, warm up, run ``job`` per payload, then
    report. ``threads``: torch's thread count; None pins this process to its share of the host's
    cores (``affinity.pin_worker``) with as many threads. With ``profile``, a Profiler covers
    everything after the warm-up."""

    def __init__(self, plan, wid, job, job_kwargs, load_kwargs, profile=False, threads=None):
        import torch

        from vlmlab.run.affinity import pin_worker
        from vlmlab.run.loading import load

        # Each process would otherwise start one intra-op thread per core on any core: N workers
        # oversubscribe the host N times and delay each other's kernel-launching main thread.
        if threads is None:
            pin_worker(plan, wid)
        else:
            torch.set_num_threads(threads)
        self.wid, self.devices = wid, plan.replicas[wid].gpus
        cuda = [g for g in self.devices if getattr(plan.hardware.by_index(g), "kind", None) == "cuda"]
        if cuda:  # else a device-less CUDA call (synchronize, mem_get_info) opens a context on GPU 0
            torch.cuda.set_device(cuda[0])
        t0 = time.perf_counter()
        self.lm = load(plan, replica=wid, **(load_kwargs or {}))
        self.fn, self.kwargs = resolve(job), dict(job_kwargs or {})
        warmup = self.kwargs.pop("warmup", None)
        if warmup is not None:  # load kernels and allocator pools before the clock starts
            self.fn(self.lm, warmup, **self.kwargs)
        self.prof = None
        if profile:
            from vlmlab.observe.profiler import Profiler

            self.prof = Profiler(self.lm, plan=plan).__enter__().count(0, 0)  # a worker given no batch did 0 images
        self.load_s = time.perf_counter() - t0

    def run(self, payload) -> list:
        rows = self.fn(self.lm, payload, **self.kwargs)
        for r in rows:
            r["replica"] = self.wid
        if self.prof is not None:
            self.prof.count_rows(rows)
        return rows

    def finish(self) -> list:
        """The closing messages: ("profile", Profile, its start on perf_counter) when profiling,
        then ("peaks", {device: bytes})."""
        out = []
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            out.append(("profile", self.prof.result(), self.prof.started_at))
        return out + [("peaks", peaks(self.devices))]


def peaks(devices) -> dict:
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


# ---------------------------------------------------------------------------- the parent's side
class Dispatcher:
    """The parent's queue of batches and its bookkeeping. A transport subclass implements
    ``start()``, ``send(wid, task)`` (``task``: (batch id, payload), or None: finish),
    ``poll(timeout)`` (feeds the workers' messages to ``handle`` and their deaths to ``lost``;
    False when nothing happened) and ``stop(finished)``; :func:`drive` runs the loop."""

    def __init__(self, n_workers, payloads, on_rows=None):
        self.payloads, self.pending = payloads, deque(range(len(payloads)))
        self.live, self.inflight, self.done, self.idle = set(range(n_workers)), {}, set(), set()
        self.stats, self.rows, self.on_rows = RunStats(workers=n_workers), [], on_rows

    def give(self, wid):
        """Send ``wid`` its next batch; with none left while others still work, park it (a batch
        may yet come back from a worker that dies); with nothing left at all, tell it to finish."""
        task = self.pending.popleft() if self.pending else None
        if task is None and self.inflight:
            self.idle.add(wid)
            return
        self.idle.discard(wid)
        if task is not None:
            self.inflight[wid] = task
        self.send(wid, None if task is None else (task, self.payloads[task]))

    def lost(self, wid, reason):
        if wid not in self.live:
            return
        self.live.discard(wid)
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
        elif kind == "peaks":  # the worker's last message
            for d, b in msg[1].items():
                self.stats.peaks[d] = max(self.stats.peaks.get(d, 0), b)
            self.live.discard(wid)
        elif kind == "error":
            self.stats.died[wid] = msg[1].strip().splitlines()[-1]
            self.stats.warnings.append(f"replica {wid} failed:\n{msg[1]}")


def drive(pool: Dispatcher, start_timeout: float = 600.0) -> tuple[list, RunStats]:
    """Run ``pool`` until every payload is done: start the workers, say go once every survivor has
    loaded, hand out batches, then collect the workers' closing reports. Ctrl-C stops the workers
    and re-raises; the finished batches have gone to ``on_rows`` already."""
    n, t0, t_go = len(pool.payloads), time.perf_counter(), None
    pool.start()
    try:
        while len(pool.done) < n:
            pool.poll(POLL_S)
            if not pool.live and len(pool.done) < n:
                raise WorkerError("every worker died: " + "; ".join(
                    f"replica {w}: {r}" for w, r in pool.stats.died.items()), pool.rows)
            if t_go is None and pool.live <= set(pool.stats.load_s):  # all survivors loaded: go
                t_go = pool.stats.go_at = time.perf_counter()
                for wid in sorted(pool.live):
                    pool.give(wid)
            if t_go is None and time.perf_counter() - t0 > start_timeout:
                raise WorkerError(f"not every worker was ready after {start_timeout:.0f} s", pool.rows)
        pool.stats.busy_s = time.perf_counter() - t_go if t_go is not None else 0.0
        deadline = time.perf_counter() + 30
        while pool.live and time.perf_counter() < deadline:  # idle workers were told to stop: read their peaks
            pool.poll(POLL_S)
    except KeyboardInterrupt:
        pool.stats.warnings.append("interrupted: workers stopped, finished batches kept")
        raise
    finally:
        pool.stop(len(pool.done) == n)
        pool.stats.wall_s = time.perf_counter() - t0
    return pool.rows, pool.stats
