"""A Ray cluster: this process's connection to it and the devices of its nodes.

``vlmlab.gpus("ray")`` (``hardware.ray_cluster``) turns what :func:`ray_devices` finds into Gpus;
``vlmlab.run.ray_backend`` runs replicas there. Ray is optional (``pip install "vlmlab[ray]"``) and
imported only here and in the backend, on first use.
"""
from __future__ import annotations


def connect_ray(address: str | None = None):
    """This process's connection to a Ray cluster (made once; an existing one is reused); returns
    the ``ray`` module. ``address`` None: as ``ray.init()`` finds it (RAY_ADDRESS, a cluster
    started on this machine, else a new local one)."""
    try:
        import ray
    except ImportError:
        raise ImportError("Ray is not installed: pip install 'vlmlab[ray]'") from None
    if not ray.is_initialized():
        try:
            ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        except ConnectionError as err:
            raise ConnectionError(f"no Ray cluster answers at {address!r} ({err}). Start one with `ray start "
                                  "--head` (and `ray start --address=HEAD:6379` on the other nodes), or give "
                                  "its address: vlmlab.gpus('ray://head:10001').") from None
    return ray


def ray_devices(spec: str, probe, timeout: float = 60.0) -> tuple[list[dict], str, str | None]:
    """(device dicts in node order, a message, the address) for ``spec`` "ray", "ray://host:port"
    (Ray Client) or "ray:host:port". Nodes with GPUs give their GPUs as ``probe`` (a function run
    there as a Ray task: NVML on that node) describes them; a cluster without GPUs gives one CPU
    slot per CPU of each node, sharing the node's Ray memory."""
    address = None if spec.lower() == "ray" else spec if spec.lower().startswith("ray://") else spec[4:]
    ray = connect_ray(address)
    nodes = sorted((n for n in ray.nodes() if n.get("Alive")),
                   key=lambda n: ("node:__internal_head__" not in n["Resources"], n["NodeManagerAddress"], n["NodeID"]))
    gpu_nodes = [n for n in nodes if n["Resources"].get("GPU", 0) >= 1]
    devices, notes = [], []
    if gpu_nodes:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        task = ray.remote(num_cpus=0)(probe)
        found = ray.get([task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                         .remote() for n in gpu_nodes], timeout=timeout)
        for n, there in zip(gpu_nodes, found):
            count = int(n["Resources"]["GPU"])
            if len(there) < count:
                notes.append(f"node {n['NodeID'][:8]}: Ray counts {count} GPU(s), NVML describes {len(there)}")
            devices += [{**g, "node": n["NodeID"], "host": n["NodeManagerAddress"]} for g in there[:count]]
        if len(gpu_nodes) < len(nodes):
            notes.append(f"{len(nodes) - len(gpu_nodes)} CPU-only node(s) not listed")
    else:
        for n in nodes:
            count = int(n["Resources"].get("CPU", 0))
            share = int(n["Resources"].get("memory", 0)) // max(count, 1)
            devices += [{"index": 0, "name": "CPU worker", "total": share, "free": share, "kind": "cpu",
                         "node": n["NodeID"], "host": n["NodeManagerAddress"]} for _ in range(count)]
    for i, d in enumerate(devices):
        d["index"] = i
    message = "; ".join(notes) if devices else "the Ray cluster has no alive node with a GPU or a CPU"
    return devices, message, address
