"""Which host cores each replica worker may run on.

Eager ``generate`` is bound by the host as much as by the GPU: every decode step launches a few
hundred kernels from one Python thread and waits for the next token. With several workers on one
host, threads that migrate between cores, or a worker scheduled on the far socket from its GPU,
make every replica slower than one alone. So each worker gets its own cores: those near its GPU
(NVML's CPU affinity of the card, i.e. its NUMA node), split evenly between the workers whose GPUs
share that node, and as many torch threads as it has cores. CPU workers split the usable cores.

``VLMLAB_PIN_WORKERS=0`` turns pinning off (threads are still limited to the worker's share).
"""
from __future__ import annotations

import os


def usable_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def gpu_local_cpus(nvml_index: int | None) -> set[int] | None:
    """The host cores NVML calls close to this GPU, or None when NVML cannot say."""
    if nvml_index is None:
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no NVML: no topology
        return None
    try:
        words = ((os.cpu_count() or 64) + 63) // 64
        masks = pynvml.nvmlDeviceGetCpuAffinity(pynvml.nvmlDeviceGetHandleByIndex(nvml_index), words)
        return {64 * w + b for w, mask in enumerate(masks) for b in range(64) if (mask >> b) & 1}
    except Exception:  # noqa: BLE001 - older drivers, MIG, VMs without topology
        return None
    finally:
        pynvml.nvmlShutdown()


def split_cpus(local: list[set[int] | None], usable: list[int]) -> list[list[int]]:
    """Cores for each worker, given the cores near each worker's GPU(s) (None: no preference).

    Workers with the same near cores share them in equal contiguous slices; a worker whose near
    cores are unknown or not usable here draws from all usable cores with the others like it.
    With more workers than cores, slices overlap one core each rather than being empty.
    """
    usable_set, members = set(usable), {}
    for w, near in enumerate(local):
        cores = tuple(sorted(usable_set & near)) if near else ()
        members.setdefault(cores or tuple(usable), []).append(w)
    out: list[list[int]] = [[] for _ in local]
    for key, workers in members.items():
        cores, m = list(key), len(workers)
        for rank, w in enumerate(workers):
            if len(cores) >= m:
                lo, hi = rank * len(cores) // m, (rank + 1) * len(cores) // m
                out[w] = cores[lo:hi]
            else:
                out[w] = [cores[rank % len(cores)]]
    return out


def worker_cpus(plan, wid: int) -> list[int]:
    """The cores replica ``wid`` of ``plan`` should use."""
    local = []
    for replica in plan.replicas:
        sets = []
        for g in replica.gpus:
            gpu = plan.hardware.by_index(g) if isinstance(g, int) else None
            near = gpu_local_cpus(gpu.nvml_index) if gpu is not None and gpu.kind == "cuda" else None
            if near:
                sets.append(near)
        local.append(set.intersection(*sets) if sets else None)
    return split_cpus(local, usable_cpus())[wid]


def pin_worker(plan, wid: int) -> list[int]:
    """Pin this process to its cores (unless ``VLMLAB_PIN_WORKERS=0``) and size torch's thread
    pool to them. Returns the cores."""
    import torch

    cores = worker_cpus(plan, wid)
    if os.environ.get("VLMLAB_PIN_WORKERS", "1") != "0" and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, cores)
        except OSError:  # a container may forbid it; the thread limit still helps
            pass
    torch.set_num_threads(max(1, len(cores)))
    return cores
