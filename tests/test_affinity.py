"""Worker core assignment: the split rule on made-up topologies, and a real spawned worker."""
import os

import pytest

from vlmlab.run.affinity import split_cpus, usable_cpus


def test_two_numa_nodes_four_gpus_get_disjoint_local_halves():
    node0, node1 = set(range(0, 32)), set(range(32, 64))
    out = split_cpus([node0, node0, node1, node1], list(range(64)))
    assert out == [list(range(0, 16)), list(range(16, 32)), list(range(32, 48)), list(range(48, 64))]


def test_unknown_topology_splits_all_usable_cores_evenly():
    out = split_cpus([None, None, None], [0, 1, 2, 3, 4, 5, 6])
    assert out == [[0, 1], [2, 3], [4, 5, 6]]
    assert sorted(c for cores in out for c in cores) == list(range(7))


def test_near_cores_outside_this_process_fall_back_to_usable_ones():
    # a container allowed cores 0-7 only; NVML says the GPU sits near 32-63
    assert split_cpus([set(range(32, 64))], list(range(8))) == [list(range(8))]


def test_more_workers_than_cores_share_one_core_each_never_none():
    out = split_cpus([None, None, None], [0, 1])
    assert out == [[0], [1], [0]]


def test_mixed_known_and_unknown_groups():
    out = split_cpus([{0, 1, 2, 3}, None], list(range(8)))
    assert out == [[0, 1, 2, 3], list(range(8))]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_spawned_cpu_workers_are_pinned_to_disjoint_cores(monkeypatch):
    import vlmlab
    from vlmlab.run import workers

    p = vlmlab.plan("vlmlab/tiny-captioner", gpus="2xcpu", strategy="replicate")
    rows, stats = workers.run_replicas(p, [0, 1, 2, 3], "tests.worker_jobs:report_cores")
    seen = {r["pid"]: tuple(r["cores"]) for r in rows}
    assert len(seen) == 2 and not stats.died
    cores = list(seen.values())
    n = len(usable_cpus())
    if n >= 2:
        assert not set(cores[0]) & set(cores[1])
    assert all(r["threads"] == len(r["cores"]) for r in rows)
