"""Replicas on a Ray cluster: a local cluster of two nodes (``ray.cluster_utils.Cluster``), four CPU
replicas of the bundled captioner (two per node), 200 generated images.

Exactly once is checked on the journal, line by line: every image has exactly one row in it, also
after a node is removed mid-run and after the driver is interrupted (Ctrl-C) and then killed
(SIGKILL) mid-run and rerun with the same journal. The faulty drivers run as subprocesses.

Kept small for CI: one cluster for the module (2 + 2 CPUs), one torch thread per actor. Without
Ray installed only the tests that need no cluster run (planning by node, an actor's view of its
replica); the rest skip.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

import vlmlab
from vlmlab.hardware import GiB, Gpu, Hardware

try:
    import ray
except ImportError:
    ray = None
needs_ray = pytest.mark.skipif(ray is None, reason="Ray is not installed (pip install 'vlmlab[ray]')")

N_IMAGES = 200
BATCH = 4
NODE_CPUS = 2

# A driver in its own process, so that the test can interrupt, kill or outlive it.
DRIVER = """
import json, signal, sys
# Ctrl-C as in a shell: a pytest process can hand its children SIGINT ignored or blocked (this test's driver
# then ran to the end, exit 0, in full suites only); say so, then take it back
inherited = (signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}))
if inherited[0] is not signal.default_int_handler or signal.SIGINT in inherited[1]:
    print(f"driver: SIGINT came in as {inherited[0]}, blocked: {signal.SIGINT in inherited[1]}", file=sys.stderr)
signal.signal(signal.SIGINT, signal.default_int_handler)
import vlmlab
folder, out, address, per_node = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if sys.argv[5:] == ["slow"]:  # 0.3 s a batch: a run that cannot end before the test's signal lands
    import time
    from vlmlab.run.journal import Journal
    append = Journal.append
    Journal.append = lambda self, rows: (append(self, rows), time.sleep(0.3))[0]
cluster = vlmlab.gpus("ray:" + address)
cluster = cluster.select(indices=[g.index for devices in cluster.nodes().values() for g in devices[:per_node]])
plan = vlmlab.plan(None, gpus=cluster, strategy="replicate", dtype="float32", batch_size=4)
result = vlmlab.caption(folder, model=plan, batch_size=4, out=out, progress=False)
rows = result.to_pandas()
print(json.dumps({"rows": len(rows), "errors": int(rows.error.notna().sum()), "resumed": result.resumed}))
"""


def _start_cluster():
    from ray.cluster_utils import Cluster

    # a generous agent start-up budget: on a busy 2-core box the dashboard agent can take >15 s to import
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": NODE_CPUS, "include_dashboard": False,
        "_system_config": {"agent_register_timeout_ms": 120_000}})
    cluster.add_node(num_cpus=NODE_CPUS)
    cluster.wait_for_nodes()
    return cluster


@pytest.fixture(scope="module")
def cluster():
    if ray is None:
        pytest.skip("Ray is not installed (pip install 'vlmlab[ray]')")
    for attempt in range(3):  # Ray's own 30 s start-up limit can trip on a loaded machine
        try:
            c = _start_cluster()
            break
        except Exception:  # noqa: BLE001
            if attempt == 2:
                raise
            time.sleep(5)
    ray.init(address=c.address, logging_level="WARNING", log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from vlmlab.assets.scenes import make_dataset

    folder = tmp_path_factory.mktemp("ray-images")
    for i, (image, _, _) in enumerate(make_dataset(N_IMAGES, seed=13, size=48)):
        image.save(folder / f"img_{i:03d}.png")
    return folder


def two_gpu_nodes():
    """A pretend cluster: two nodes of two 80 GiB GPUs, as ``gpus("ray")`` lists them."""
    return Hardware([Gpu(i, "NVIDIA H100 80GB HBM3", 80 * GiB, 80 * GiB, kind="cuda", nvml_index=i % 2,
                         node=f"node{i // 2}", host=f"10.0.0.{i // 2}") for i in range(4)], "ray", address="ray://head:10001")


def test_plans_keep_each_replica_group_inside_one_node():
    hw = two_gpu_nodes()
    assert list(hw.nodes()) == ["node0", "node1"]
    hybrid = vlmlab.plan("llava-1.5-7b", gpus=hw, strategy="hybrid", gpus_per_replica=2)
    assert [r.gpus for r in hybrid.replicas] == [[0, 1], [2, 3]]
    replicate = vlmlab.plan("llava-1.5-7b", gpus=hw, strategy="replicate")
    assert len(replicate.replicas) == 4 and replicate.runs_in_workers
    single = vlmlab.plan("llava-1.5-7b", gpus=hw, strategy="single")
    assert single.runs_in_workers  # one replica, still on the cluster: the driver holds no model
    with pytest.raises(ValueError, match="inside one node"):
        vlmlab.plan("llava-1.5-7b", gpus=hw, strategy="split")
    odd = Hardware(hw.devices[:3], "ray")  # node1 has one GPU: no 2-GPU group there
    assert [r.gpus for r in vlmlab.plan("llava-1.5-7b", gpus=odd, strategy="hybrid", gpus_per_replica=2).replicas] == [[0, 1]]
    again = vlmlab.Plan.from_json(hybrid.to_json())
    assert again.hardware.address == "ray://head:10001" and again.hardware.nodes().keys() == hw.nodes().keys()
    with pytest.raises(ValueError, match="Ray cluster"):
        vlmlab.load(hybrid)  # the driver never loads a cluster plan itself


def test_an_actor_sees_its_replica_numbered_from_zero():
    from vlmlab.run.ray_backend import local_view, placement

    plan = vlmlab.plan("llava-1.5-7b", gpus=two_gpu_nodes(), strategy="hybrid", gpus_per_replica=2)
    assert placement(plan, 1) == ("node1", 2, 2)  # node, CPUs, GPUs
    view = local_view(plan, 1)  # Ray sets CUDA_VISIBLE_DEVICES to the two GPUs it gives the actor
    assert [r.gpus for r in view.replicas] == [[0, 1]] and [g.index for g in view.hardware] == [0, 1]
    assert set(view.replicas[0].device_map.values()) == {0, 1}
    assert sorted(view.memory) == [0, 1] and view.memory[0] == plan.memory[2]
    moved = plan.move(layers=range(0, 4), to=0, replica=1)  # a group across nodes is refused before any actor starts
    with pytest.raises(ValueError, match="inside one Ray node"):
        placement(moved, 1)


def _alive_nodes():
    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def _journal_keys(path):
    return Counter(json.loads(line)["key"] for line in path.read_text().splitlines() if line.strip().endswith("}"))


def _driver(images, out, address, per_node=NODE_CPUS, slow=False):
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(images), str(out), address, str(per_node)]
                            + (["slow"] if slow else []),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait_for_rows(path, n, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and sum(_journal_keys(path).values()) >= n:
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the driver ended before {n} rows: {proc.communicate()}")
        time.sleep(0.2)
    raise AssertionError(f"fewer than {n} rows in {path} after {timeout} s")


def _free_cpus_return(total, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ray.available_resources().get("CPU", 0) >= total:
            return True
        time.sleep(0.5)
    return False


@needs_ray
def test_cluster_devices_by_node(cluster):
    hw = vlmlab.gpus("ray")
    assert hw.source == "ray" and hw.is_cpu
    assert len(hw) == 2 * NODE_CPUS
    assert set(hw.nodes()) == _alive_nodes()
    plan = vlmlab.plan(None, gpus=hw, strategy="hybrid", gpus_per_replica=2, dtype="float32")
    assert [len({hw.by_index(g).node for g in r.gpus}) for r in plan.replicas] == [1, 1]  # one node per group
    with pytest.raises(ValueError, match="inside one node"):
        vlmlab.plan(None, gpus=hw, strategy="split", dtype="float32")
    assert vlmlab.Plan.from_json(plan.to_json()).hardware.nodes().keys() == hw.nodes().keys()


@needs_ray
def test_every_image_once_on_both_nodes(cluster, images, tmp_path):
    plan = vlmlab.plan(None, gpus=vlmlab.gpus("ray"), strategy="replicate", dtype="float32", batch_size=BATCH)
    assert len(plan.replicas) == 2 * NODE_CPUS
    out = tmp_path / "captions.jsonl"
    result = vlmlab.caption(images, model=plan, batch_size=BATCH, out=out, progress=False, profile=True)
    df = result.to_pandas()
    assert len(df) == N_IMAGES and df.error.isna().all()
    assert result.profile.images == N_IMAGES and len(result.profile.replicas) == 2 * NODE_CPUS  # each actor profiled
    assert set(df.node) == _alive_nodes()  # rows name both nodes
    assert set(df.replica) == set(range(2 * NODE_CPUS)) and set(df.device) == {"cpu"}
    assert set(_journal_keys(out).values()) == {1} and len(_journal_keys(out)) == N_IMAGES
    from vlmlab.assets.scenes import parse_caption

    assert df.caption.map(parse_caption).notna().mean() > 0.9  # real captions of the scenes
    assert _free_cpus_return(2 * NODE_CPUS)  # the actors are gone


@needs_ray
def test_interrupted_then_killed_driver_resumes_exactly_once(cluster, images, tmp_path):
    out = tmp_path / "captions.jsonl"  # one replica per node here: three runs of four actors would be slow
    first = _driver(images, out, cluster.address, per_node=1, slow=True)  # Ctrl-C mid-run: actors stop, batches done kept
    _wait_for_rows(out, 3 * BATCH, first)
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=60)
    assert first.returncode != 0 and "KeyboardInterrupt" in err, err[-2000:]
    after_interrupt = sum(_journal_keys(out).values())
    assert 0 < after_interrupt < N_IMAGES
    assert _free_cpus_return(2 * NODE_CPUS)

    second = _driver(images, out, cluster.address, per_node=1, slow=True)  # SIGKILL mid-run: nothing runs any cleanup
    _wait_for_rows(out, after_interrupt + 3 * BATCH, second)
    second.kill()
    second.wait(timeout=30)
    assert sum(_journal_keys(out).values()) < N_IMAGES
    assert _free_cpus_return(2 * NODE_CPUS)  # Ray ends the actors of a dead driver

    third = _driver(images, out, cluster.address, per_node=1)
    stdout, err = third.communicate(timeout=300)
    assert third.returncode == 0, err[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["rows"] == N_IMAGES and summary["errors"] == 0 and summary["resumed"] > 0
    keys = _journal_keys(out)
    assert len(keys) == N_IMAGES and set(keys.values()) == {1}, keys.most_common(3)


@needs_ray
def test_node_removed_mid_run_loses_and_duplicates_nothing(cluster, images, tmp_path):
    out = tmp_path / "captions.jsonl"
    worker_node = cluster.list_all_nodes()[1]
    driver = _driver(images, out, cluster.address)
    _wait_for_rows(out, 3 * BATCH, driver)
    cluster.remove_node(worker_node)  # its two replicas die with batches in flight
    try:
        stdout, err = driver.communicate(timeout=300)
        assert driver.returncode == 0, err[-3000:]
        summary = json.loads(stdout.strip().splitlines()[-1])
        assert summary == {"rows": N_IMAGES, "errors": 0, "resumed": 0}
        keys = _journal_keys(out)
        assert len(keys) == N_IMAGES and set(keys.values()) == {1}, keys.most_common(3)  # 0 lost, 0 duplicated
        nodes = Counter(json.loads(line)["node"] for line in out.read_text().splitlines())
        assert worker_node.node_id in nodes and nodes[worker_node.node_id] < N_IMAGES
    finally:
        cluster.add_node(num_cpus=NODE_CPUS)  # whole again for any later test


@needs_ray
def test_gpu_picker_lists_the_cluster_by_node(cluster):
    pytest.importorskip("ipywidgets")
    from vlmlab.ui.widgets import GpuPicker

    picker = GpuPicker(machine=Hardware([], "none", "No GPU found on this machine"))
    picker.source.value = "ray"
    assert picker.runnable is None and "Connect" in picker.message.value
    picker.address.value = "ray"
    picker.connect()
    headings = [r for r in picker.rows.children if "node " in getattr(r, "value", "")]
    assert len(headings) == 2 and len(picker.checks) == 2 * NODE_CPUS
    picker.checks[0].value = False
    hw = picker.runnable
    assert hw.source == "ray" and [g.index for g in hw] == [1, 2, 3] and set(hw.nodes()) == _alive_nodes()
