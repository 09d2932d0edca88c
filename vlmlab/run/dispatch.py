"""A replicated run, whatever carries its messages: the parent's queue of batches
(:class:`Dispatcher`, :func:`drive`) and a replica's side of it (:class:`ReplicaJob`).

Two transports use them: spawned worker processes on this host (``vlmlab.run.workers``) and Ray
actors on a cluster's nodes (``vlmlab.run.ray_backend``). So the rules are the same on both:
batches go out one at a time to whichever worker is free (a faster replica simply takes more);
the parent always knows which batch each worker holds, so a worker that dies loses nothing (its
batch goes back to the queue for the survivors); the first result of a batch is the only one kept,
so every batch counts exactly once; ``on_rows`` (journal, progress bar) runs in the parent once
per finished batch; Ctrl-C stops every worker and keeps what is done.

Nothing hangs and no input takes the run down: a batch that runs far longer than any finished one
(``hang_limit``) has its worker killed, as a stopped or deadlocked process never answers; a worker
that died or was killed holding a batch goes back to the queue. With ``isolate`` (captioning has
one) the worker is also started again (where the transport can), a batch on which workers died
twice is split into single items, and a single item on which they died twice is set aside:
``isolate(payload, reason)`` gives its rows (an error row per image).

A *job* is ``"module:function"`` called in the worker as ``function(loaded_model, payload, **kwargs)``
and returning a list of row dicts; ``vlmlab.run.batch:caption_items`` captions images and
``vlmlab.run.dry_run:synthetic_batch`` runs caption-shaped generates on random-weight models.
"""
from __future__ import annotations

import importlib
import os
import time
from collections import Counter, deque
from dataclasses import dataclass, field

POLL_S = 0.2
DEATHS_PER_BATCH = 2  # a batch on which workers died this often is split (a single item: set aside)
HANG_FACTOR = 10  # a batch running this many times longer than the slowest finished one is hung ...
HANG_MIN_S = 60.0  # ... and at least this long (env VLMLAB_HANG_MIN_S); before any batch finished: 10x this


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
    notices: list = field(default_factory=list)  # one line per worker that died or hung, for the user
    restarts: int = 0  # workers started again after dying with a batch
    isolated: int = 0  # single items set aside after workers died on them twice

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

    def __init__(self, plan, wid, job, job_kwargs, load_kwargs, profile=False, threads=None, phase=None):
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
            if phase is not None:
                phase("warming up")
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
    False when nothing happened) and ``stop(finished)``; optionally ``kill(wid)`` (then hung workers
    are killed) and ``restart(wid)`` (then a worker that died with a batch is started again);
    :func:`drive` runs the loop. ``isolate`` and ``on_phase``: see :func:`vlmlab.run.workers.run_replicas`."""

    def __init__(self, n_workers, payloads, on_rows=None):
        self.payloads, self.pending = list(payloads), deque(range(len(payloads)))
        self.live, self.inflight, self.done, self.idle = set(range(n_workers)), {}, set(), set()
        self.stats, self.rows, self.on_rows = RunStats(workers=n_workers), [], on_rows
        self.isolate = self.on_phase = None
        self.deaths = Counter()  # batch -> workers that died holding it
        self.sent_at, self.durations, self.phases = {}, [], {w: "starting" for w in range(n_workers)}
        self.failures_in_a_row = 0  # deaths since a batch last finished: restarts stop past a limit

    def remaining(self) -> bool:
        return bool(self.pending or self.inflight)

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
            self.sent_at[wid] = time.perf_counter()
            self.phases[wid] = "working"
        self.send(wid, None if task is None else (task, self.payloads[task]))

    def lost(self, wid, reason):
        if wid not in self.live:
            return
        self.live.discard(wid)
        self.stats.died[wid] = reason
        task = self.inflight.pop(wid, None)
        what = "stopped answering" if reason.startswith("not responding") else "died"
        if task is not None and task not in self.done:
            self.deaths[task] += 1
            self.failures_in_a_row += 1
            if self.deaths[task] < DEATHS_PER_BATCH or self.isolate is None:
                self.pending.appendleft(task)
                self.stats.requeued += 1
                fate = "its batch went back to the queue"
            else:
                fate = self.set_aside(task, reason)
        else:
            fate = "it held no batch"
        self.stats.warnings.append(f"replica {wid} {what} ({reason}); {fate}")
        self.stats.notices.append(f"replica {wid} {what} ({reason.strip().splitlines()[-1][:200]}); {fate}")
        self.idle.discard(wid)
        for other in list(self.idle):  # a parked survivor takes the requeued batch (or is told to stop)
            self.give(other)
        restart = getattr(self, "restart", None)
        if (restart is not None and self.isolate is not None and task is not None and wid in self.stats.load_s
                and self.pending and self.failures_in_a_row <= 4 + 2 * self.stats.workers):
            restart(wid)  # it worked until this batch: start it again for the rest
            self.live.add(wid)
            self.phases[wid] = "restarting"
            self.stats.restarts += 1

    def set_aside(self, task, reason) -> str:
        """Workers died twice on ``task``: split it into single items, or give its one item up."""
        self.done.add(task)
        payload = self.payloads[task]
        if isinstance(payload, list) and len(payload) > 1:
            for item in payload:
                self.payloads.append([item])
                self.pending.append(len(self.payloads) - 1)
            return f"workers died twice on its batch of {len(payload)}, now retried one item at a time"
        rows = self.isolate(payload, reason) if self.isolate is not None else []
        self.stats.isolated += 1
        self.rows.extend(rows)
        if rows and self.on_rows is not None:
            self.on_rows(rows)
        return "workers died twice on its one item, which was set aside" + ("" if rows else " without a row")

    def hang_limit(self) -> float:
        """Seconds after which a batch counts as hung: far longer than any batch that finished."""
        floor = float(os.environ.get("VLMLAB_HANG_MIN_S", HANG_MIN_S))
        return max(floor, HANG_FACTOR * max(self.durations)) if self.durations else HANG_FACTOR * floor

    def check_hung(self):
        """Kill a worker whose batch has run past :meth:`hang_limit`; its batch goes back to the queue
        as a dead worker's does."""
        kill = getattr(self, "kill", None)
        if kill is None:
            return
        limit, now = self.hang_limit(), time.perf_counter()
        for wid in list(self.inflight):
            ran = now - self.sent_at.get(wid, now)
            if ran > limit and wid in self.live:
                kill(wid)
                self.lost(wid, f"not responding: its batch ran {ran:.0f} s, over the {limit:.0f} s limit "
                               f"({HANG_FACTOR}x the slowest finished batch)")

    def report_phase(self):
        if self.on_phase is not None and self.stats.go_at is None:
            counts = Counter(self.phases.get(w, "starting") for w in self.live)
            self.on_phase(", ".join(f"{n} {phase}" for phase, n in sorted(counts.items())))

    def handle(self, wid, msg):
        kind = msg[0]
        if kind == "phase":
            self.phases[wid] = msg[1]
            self.report_phase()
        elif kind == "ready":
            self.stats.load_s[wid] = msg[1]
            self.phases[wid] = "ready"
            self.report_phase()
            if self.stats.go_at is not None:  # started again after the go signal: straight to work
                self.give(wid)
        elif kind == "done":
            self.inflight.pop(wid, None)
            self.failures_in_a_row = 0
            if wid in self.sent_at:
                self.durations.append(time.perf_counter() - self.sent_at.pop(wid))
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
            self.stats.notices.append(f"replica {wid} failed: {self.stats.died[wid][:200]}")


def drive(pool: Dispatcher, start_timeout: float = 600.0) -> tuple[list, RunStats]:
    """Run ``pool`` until every payload is done: start the workers, say go once every survivor has
    loaded, hand out batches, then collect the workers' closing reports. Ctrl-C stops the workers
    and re-raises; the finished batches have gone to ``on_rows`` already."""
    t0, t_go = time.perf_counter(), None
    pool.start()
    pool.report_phase()
    try:
        while pool.remaining():
            pool.poll(POLL_S)
            pool.check_hung()
            if not pool.live and pool.remaining():
                raise WorkerError("every worker died: " + "; ".join(
                    f"replica {w}: {r}" for w, r in pool.stats.died.items()), pool.rows)
            if t_go is None and pool.live <= set(pool.stats.load_s):  # all survivors loaded: go
                t_go = pool.stats.go_at = time.perf_counter()
                if pool.on_phase is not None:
                    pool.on_phase("")
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
        pool.stop(not pool.remaining())
        pool.stats.wall_s = time.perf_counter() - t0
    return pool.rows, pool.stats
