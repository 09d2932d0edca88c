"""One worker process per replica group: how ``replicate`` and ``hybrid`` plans run on this host.

Threads do not scale here (two thread replicas on 2 H200s were slower than one GPU: the GIL and
one CUDA context serialise them); processes do. Workers are *spawned*, never forked — CUDA cannot
survive a fork, and the notebook kernel must not initialise CUDA before spawning.

This module is the process transport of :mod:`vlmlab.run.dispatch` (the queue of batches, re-queuing
a dead worker's batch, Ctrl-C, the replica's own loop live there); a plan made for a Ray cluster
runs on its other transport, :mod:`vlmlab.run.ray_backend`. :func:`run_replicas` picks one.
"""
from __future__ import annotations

import multiprocessing as mp
import signal
import time
import traceback
from multiprocessing.connection import wait

from vlmlab.run.dispatch import Dispatcher, ReplicaJob, RunStats, WorkerError, drive, peaks, resolve  # noqa: F401


def _worker(wid, plan_json, job, job_kwargs, load_kwargs, conn, profile=False):
    """Load replica ``wid``, then ask the parent for batches until it sends None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    try:
        from vlmlab.plan.plan import Plan

        replica = ReplicaJob(Plan.from_json(plan_json), wid, job, job_kwargs, load_kwargs, profile)
        conn.send(("ready", replica.load_s))
        while (task := conn.recv()) is not None:
            task_id, payload = task
            conn.send(("done", task_id, replica.run(payload)))
        for message in replica.finish():
            conn.send(message)
    except BaseException:  # noqa: BLE001 - report anything, then die
        try:
            conn.send(("error", traceback.format_exc(limit=8)))
        finally:
            raise SystemExit(1) from None


class _Pool(Dispatcher):
    """Spawned worker processes, one pipe each; a worker killed mid-write can only break its own pipe."""

    def __init__(self, plan, payloads, job, job_kwargs, load_kwargs, on_rows=None, profile=False):
        super().__init__(len(plan.replicas), payloads, on_rows)
        ctx = mp.get_context("spawn")
        self.conns, self.procs = {}, {}
        plan_json = plan.to_json(indent=None)
        for wid in range(len(plan.replicas)):
            parent, child = ctx.Pipe()
            self.conns[wid] = parent
            self.procs[wid] = ctx.Process(target=_worker, name=f"vlmlab-replica-{wid}", daemon=True,
                                          args=(wid, plan_json, job, dict(job_kwargs or {}), load_kwargs or {}, child,
                                                profile))

    def start(self):
        for p in self.procs.values():
            p.start()

    def send(self, wid, task):
        try:
            self.conns[wid].send(task)
        except OSError:
            self.lost(wid, "its pipe closed")

    def poll(self, timeout):
        by_conn = {self.conns[w]: w for w in self.live}
        by_sentinel = {self.procs[w].sentinel: w for w in self.live}
        ready = wait(list(by_conn) + list(by_sentinel), timeout=timeout)
        for r in ready:
            if r in by_conn and by_conn[r] in self.live:
                wid = by_conn[r]
                try:
                    while wid in self.live and self.conns[wid].poll():
                        self.handle(wid, self.conns[wid].recv())
                except (EOFError, OSError):
                    self.lost(wid, f"exited with code {self.procs[wid].exitcode}")
        for r in ready:
            wid = by_sentinel.get(r)
            if wid is not None and wid in self.live:
                self.procs[wid].join(timeout=1)
                self.lost(wid, f"exited with code {self.procs[wid].exitcode}")
        return bool(ready)

    def stop(self, finished):
        for p in self.procs.values():
            p.join(timeout=5 if finished else 0)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)


def run_replicas(plan, payloads: list, job: str, job_kwargs: dict | None = None, on_rows=None,
                 load_kwargs: dict | None = None, start_timeout: float = 600.0,
                 profile: bool = False) -> tuple[list, RunStats]:
    """Run ``job`` over ``payloads`` (one batch each) on one worker per replica of ``plan``: a
    spawned process on this host, or, for a plan made for a Ray cluster (``gpus("ray")``), a Ray
    actor on its node.

    ``on_rows(rows)`` is called in this process as each batch finishes (journal, progress bar).
    ``profile``: every worker profiles its replica; ``stats.profile()`` merges them.
    Returns (rows in completion order, RunStats).
    """
    if plan.hardware.source == "ray":
        from vlmlab.run.ray_backend import RayPool as transport
    else:
        transport = _Pool
    return drive(transport(plan, payloads, job, job_kwargs, load_kwargs, on_rows, profile), start_timeout)


def run_in_process(lm, payloads: list, job: str, job_kwargs: dict | None = None, on_rows=None) -> tuple[list, RunStats]:
    """The same contract as :func:`run_replicas` for ``single`` and ``split`` plans: no worker."""
    fn, kwargs = resolve(job), dict(job_kwargs or {})
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
    stats.peaks = peaks(lm.devices)
    return rows_out, stats
