"""One worker process per replica group: how ``replicate`` and ``hybrid`` plans run on this host.

Threads do not scale here (two thread replicas on 2 H200s were slower than one GPU: the GIL and
one CUDA context serialise them); processes do. Workers are *spawned*, never forked — CUDA cannot
survive a fork, and the notebook kernel must not initialise CUDA before spawning.

This module is the process transport of :mod:`vlmlab.run.dispatch` (the queue of batches, re-queuing
a dead worker's batch, Ctrl-C, the replica's own loop live there); a plan made for a Ray cluster
runs on its other transport, :mod:`vlmlab.run.ray_backend`. :func:`run_replicas` picks one.

Workers start without the parent's ``__main__``: spawn would otherwise re-run the user's script in
every worker, which fails for ``python - <<EOF`` ('<stdin>') and, in a script without an
``if __name__ == "__main__"`` guard, starts workers from the workers.
"""
from __future__ import annotations

import multiprocessing as mp
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from multiprocessing.connection import wait

from vlmlab.run.dispatch import Dispatcher, ReplicaJob, RunStats, WorkerError, drive, peaks, resolve  # noqa: F401


def _worker(wid, plan_json, job, job_kwargs, load_kwargs, conn, profile=False):
    """Load replica ``wid``, then ask the parent for batches until it sends None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    try:
        conn.send(("phase", "loading"))
        from vlmlab.plan.plan import Plan

        replica = ReplicaJob(Plan.from_json(plan_json), wid, job, job_kwargs, load_kwargs, profile,
                             phase=lambda text: conn.send(("phase", text)))
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
        self.ctx = mp.get_context("spawn")
        self.conns, self.procs = {}, {}
        self.worker_args = (plan.to_json(indent=None), job, dict(job_kwargs or {}), load_kwargs or {}, profile)
        for wid in range(len(plan.replicas)):
            self._new_process(wid)

    def _new_process(self, wid):
        plan_json, job, job_kwargs, load_kwargs, profile = self.worker_args
        parent, child = self.ctx.Pipe()
        self.conns[wid] = parent
        self.procs[wid] = self.ctx.Process(target=_worker, name=f"vlmlab-replica-{wid}", daemon=True,
                                           args=(wid, plan_json, job, dict(job_kwargs), load_kwargs, child, profile))

    def start(self):
        for p in self.procs.values():
            with _without_main_module():
                p.start()

    def restart(self, wid):
        self.procs[wid].join(timeout=1)
        self._new_process(wid)
        with _without_main_module():
            self.procs[wid].start()

    def kill(self, wid):
        proc = self.procs[wid]
        if proc.is_alive():
            proc.kill()  # SIGKILL ends a stopped (SIGSTOP) process too
            proc.join(timeout=5)

    def send(self, wid, task):
        try:
            self.conns[wid].send(task)
        except OSError:
            self.lost(wid, "its pipe closed")

    def poll(self, timeout):
        by_conn = {self.conns[w]: w for w in self.live}
        by_sentinel = {self.procs[w].sentinel: w for w in self.live}
        procs = dict(self.procs)  # a worker restarted below may reuse a closed sentinel's number
        ready = wait(list(by_conn) + list(by_sentinel), timeout=timeout)
        for r in ready:
            if r in by_conn and by_conn[r] in self.live and self.conns[by_conn[r]] is r:  # not since restarted
                wid = by_conn[r]
                try:
                    while wid in self.live and self.conns[wid] is r and r.poll():
                        self.handle(wid, r.recv())
                except (EOFError, OSError):
                    self.procs[wid].join(timeout=1)
                    self.lost(wid, f"exited with code {self.procs[wid].exitcode}")
        for r in ready:
            wid = by_sentinel.get(r)
            if wid is not None and wid in self.live and self.procs[wid] is procs[wid]:
                self.procs[wid].join(timeout=1)
                self.lost(wid, f"exited with code {self.procs[wid].exitcode}")
        return bool(ready)

    def stop(self, finished):
        for p in self.procs.values():
            p.join(timeout=5 if finished else 0)
            if p.is_alive():
                p.kill() if _is_stopped(p.pid) else p.terminate()
                p.join(timeout=5)


_MAIN_LOCK = threading.Lock()


@contextmanager
def _without_main_module():
    """Start a spawned process without telling it about ``__main__``. Spawn re-imports the parent's
    main module (by path or module name) so that functions pickled from it resolve; the workers need
    nothing from it (their function and jobs live in importable modules), and re-running the user's
    script is exactly what breaks ``python -`` and scripts without a ``__main__`` guard."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    with _MAIN_LOCK:
        saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
        main.__dict__.pop("__file__", None)
        main.__spec__ = None
        try:
            yield
        finally:
            main.__dict__.pop("__spec__", None)
            main.__dict__.update(saved)


def _is_stopped(pid) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def run_replicas(plan, payloads: list, job: str, job_kwargs: dict | None = None, on_rows=None,
                 load_kwargs: dict | None = None, start_timeout: float = 600.0,
                 profile: bool = False, isolate=None, on_phase=None) -> tuple[list, RunStats]:
    """Run ``job`` over ``payloads`` (one batch each) on one worker per replica of ``plan``: a
    spawned process on this host, or, for a plan made for a Ray cluster (``gpus("ray")``), a Ray
    actor on its node.

    ``on_rows(rows)`` is called in this process as each batch finishes (journal, progress bar).
    ``profile``: every worker profiles its replica; ``stats.profile()`` merges them.
    ``isolate(payload, reason)``: the rows for a one-item payload on which workers died twice (list
    payloads are split into one-item lists first; a dead worker is started again); without it a dead
    worker's batch only goes back to the queue, and when every worker is dead the run fails.
    ``on_phase(text)``: what the workers do while they start ("1 loading, 1 ready").
    Returns (rows in completion order, RunStats).
    """
    if plan.hardware.source == "ray":
        from vlmlab.run.ray_backend import RayPool as transport
    else:
        transport = _Pool
    pool = transport(plan, payloads, job, job_kwargs, load_kwargs, on_rows, profile)
    pool.isolate, pool.on_phase = isolate, on_phase
    return drive(pool, start_timeout)


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
