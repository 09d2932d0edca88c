"""Replicas on a Ray cluster: one Ray actor per replica group, on that group's node.

A plan made for ``gpus("ray")`` (the GPUs of a running Ray cluster, by node; the CPUs of CPU-only
nodes) runs here instead of in local worker processes; ``workers.run_replicas`` picks this
transport from ``plan.hardware.source``. Everything that decides what counts stays on the driver
and is shared with the local workers (:mod:`vlmlab.run.dispatch`): batches go out one
at a time to whichever actor is free, the driver knows which batch each actor holds, the first
result of a batch is the only one kept, and ``on_rows`` (journal, progress bar) runs here once per
finished batch. So resume and exactly-once hold as for local workers; an actor or node that dies
has its batch re-queued to the survivors; Ctrl-C kills the actors and keeps what is done.

Why actors and not Ray Data's ``map_batches``: one call in flight per actor *is* the backpressure
(images are read and shipped only when an actor is free), re-queuing a lost batch is the same
five lines as for processes, and a replica that spans several GPUs is simply an actor holding
them; Ray Data would add pyarrow, its own retry layer (at-least-once, so the driver would still
have to de-duplicate) and a second copy of the dispatch logic.

Each actor runs :class:`~vlmlab.run.dispatch.ReplicaJob`, the same code as a local worker. Ray
gives it its GPUs through CUDA_VISIBLE_DEVICES, so the actor sees its replica numbered from 0
(:func:`local_view`); rows say the node, the replica and the physical device. Images travel as
bytes (the driver reads each file when its batch is sent), so nodes need no shared file system.
The driver needs no CUDA and no weights; every node needs vlmlab installed (``pip install
"vlmlab[ray]"``) and the model (the bundled one ships with the package; Hub models download there).
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from vlmlab.cluster import connect_ray
from vlmlab.hardware import Hardware
from vlmlab.plan.plan import Replica
from vlmlab.run.images import DatasetRow, ImageItem
from vlmlab.run.dispatch import Dispatcher, ReplicaJob


def placement(plan, wid) -> tuple[str, int, int]:
    """(node id, CPUs, GPUs) that replica ``wid`` asks Ray for: one CPU per CPU device, or one
    GPU and one CPU per GPU; all on one node."""
    devices = [plan.hardware.by_index(g) for g in plan.replicas[wid].gpus]
    nodes = {g.node for g in devices}
    if len(nodes) != 1 or None in nodes:
        raise ValueError(f"replica {wid} spans nodes {sorted(map(str, nodes))}: a replica group must sit inside one "
                         "Ray node. Re-plan with vlmlab.plan(..., gpus=vlmlab.gpus('ray')).")
    gpus = sum(g.kind == "cuda" for g in devices)
    return nodes.pop(), len(devices), gpus


def local_view(plan, wid):
    """Replica ``wid`` alone, its devices numbered from 0 in order, as its actor sees them."""
    r = plan.replicas[wid]
    local = {g: i for i, g in enumerate(r.gpus)}
    devices = [replace(plan.hardware.by_index(g), index=i) for g, i in local.items()]
    device_map = {k: local[v] if isinstance(v, int) else v for k, v in r.device_map.items()}
    return replace(plan, hardware=Hardware(devices, "ray-actor"),
                   replicas=[Replica(list(local.values()), device_map)],
                   memory={local[g]: b for g, b in plan.memory.items() if g in local})


def portable(payload):
    """A batch as it can travel to another node: files as their bytes, dataset rows as their
    image. A file this process cannot read stays a path, so the worker reports why."""
    if not isinstance(payload, list) or not all(isinstance(it, ImageItem) for it in payload):
        return payload  # e.g. the number of synthetic prompts of a dry run
    out = []
    for it in payload:
        source = it.source
        try:
            if isinstance(source, (str, Path)):
                source = Path(source).read_bytes()
            elif isinstance(source, DatasetRow):
                source = source.get()
        except Exception:  # noqa: BLE001 - the worker opens the original and reports the error
            source = it.source
        out.append(ImageItem(it.key, source))
    return out


class ReplicaActor:
    """The actor: one replica loaded on its node; the driver calls ``ready``, ``run`` per batch,
    then ``finish``. Every call returns the worker messages that :class:`Dispatcher` reads."""

    def __init__(self, plan_json, wid, job, job_kwargs, load_kwargs, profile, threads):
        import ray

        from vlmlab.plan.plan import Plan

        plan = Plan.from_json(plan_json)
        self.wid, self.node = wid, ray.get_runtime_context().get_node_id()
        self.gpus = plan.replicas[wid].gpus
        self.device = ",".join(f"cuda:{g}" for g in ray.get_gpu_ids()) or None  # physical, on this node
        self.replica = ReplicaJob(local_view(plan, wid), 0, job, job_kwargs, load_kwargs, profile, threads=threads)

    def ready(self):
        return [("ready", self.replica.load_s)]

    def run(self, task_id, payload):
        rows = self.replica.run(payload)
        for r in rows:
            r.update(node=self.node, replica=self.wid)
            if self.device and r.get("device"):
                r["device"] = self.device
        return [("done", task_id, rows)]

    def finish(self):
        out = []
        for message in self.replica.finish():
            if message[0] == "profile":  # perf_counter is per host: send the wall-clock start
                message = ("profile", message[1], time.time() - (time.perf_counter() - message[2]))
            elif message[0] == "peaks":
                message = ("peaks", {self.gpus[d]: b for d, b in message[1].items()})
            out.append(message)
        return out


class RayPool(Dispatcher):
    """The driver's side: one actor per replica, one call in flight per actor."""

    def __init__(self, plan, payloads, job, job_kwargs, load_kwargs, on_rows=None, profile=False):
        super().__init__(len(plan.replicas), payloads, on_rows)
        self.ray = connect_ray(plan.hardware.address)
        self.placements = [placement(plan, w) for w in range(len(plan.replicas))]
        job_kwargs = dict(job_kwargs or {})
        if "warmup" in job_kwargs:
            job_kwargs["warmup"] = portable(job_kwargs["warmup"])
        self.args = (plan.to_json(indent=None), job, job_kwargs, load_kwargs or {}, profile)
        self.actors, self.calls = {}, {}  # wid -> actor handle; pending ObjectRef -> wid
        self.failed_starts = []  # (wid, reason): actors Ray refused at once, reported as lost on the next poll

    def start(self):
        self.actor_class = self.ray.remote(max_restarts=0, max_task_retries=0)(ReplicaActor)
        for wid in range(len(self.placements)):
            self.restart(wid)

    def restart(self, wid):
        """A new actor for replica ``wid`` on its node (where a node that is gone fails it at once)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node, cpus, gpus = self.placements[wid]
        plan_json, job, job_kwargs, load_kwargs, profile = self.args
        try:
            actor = self.actor_class.options(
                num_cpus=cpus, num_gpus=gpus, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
            ).remote(plan_json, wid, job, job_kwargs, load_kwargs, profile, cpus)
            ready = actor.ready.remote()
        except Exception as err:  # noqa: BLE001 - e.g. its node is known to be gone
            self.failed_starts.append((wid, _reason(err)))
            return
        self.actors[wid] = actor
        self.calls[ready] = wid

    def send(self, wid, task):
        actor = self.actors[wid]
        ref = actor.finish.remote() if task is None else actor.run.remote(task[0], portable(task[1]))
        self.calls[ref] = wid

    def poll(self, timeout):
        while self.failed_starts:
            self.lost(*self.failed_starts.pop())
        if not self.calls:
            time.sleep(timeout)
            return False
        ready, rest = self.ray.wait(list(self.calls), num_returns=1, timeout=timeout)
        if rest and ready:
            ready += self.ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        for ref in ready:
            wid = self.calls.pop(ref, None)
            if wid not in self.live:
                continue
            try:
                messages = self.ray.get(ref)
            except self.ray.exceptions.RayTaskError as err:  # the job raised: a local worker would exit
                self.handle(wid, ("error", str(err)))
                self.lost(wid, _reason(err))
            except self.ray.exceptions.RayError as err:  # the actor or its node died, or it cannot be placed
                self.lost(wid, _reason(err))
            else:
                for message in messages:
                    if message[0] == "profile":  # back onto this process's perf_counter
                        message = ("profile", message[1], message[2] - time.time() + time.perf_counter())
                    self.handle(wid, message)
        return bool(ready)

    def lost(self, wid, reason):
        self.calls = {ref: w for ref, w in self.calls.items() if w != wid}
        self.kill(wid)  # an unreachable actor might come back: it must not run on
        super().lost(wid, reason)

    def stop(self, finished):
        for wid in list(self.actors):
            self.kill(wid)

    def kill(self, wid):
        actor = self.actors.pop(wid, None)
        if actor is not None:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone with its node
                pass


def _reason(err) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"[:300]
