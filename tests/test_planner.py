"""vlmlab.plan(): every strategy on virtual boxes, user device maps, PlanError advice, bad arguments."""
import warnings

import pytest
from accelerate.utils import check_device_map

import vlmlab
from vlmlab.plan import planner as planner_module
from vlmlab.plan.devicemap import DeviceMapError, check
from vlmlab.hardware import Hardware
from vlmlab.plan.planner import PlanError

LLM = "model.language_model"
GiB = 1024**3
INPUT_GROUP = ("model.vision_tower", "model.multi_modal_projector", f"{LLM}.embed_tokens")


@pytest.fixture(scope="module")
def llava():
    return vlmlab.spec("llava-1.5-7b")


@pytest.fixture(scope="module")
def split24():
    return vlmlab.plan("llava-1.5-7b", "2x24GiB", strategy="split")


def covered_exactly_once(model, device_map):
    """Every parameter and buffer (tied ones under each name) is placed by exactly one key."""
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in model.named_buffers(remove_duplicate=False)]
    bad = {}
    for n in names:
        keys = [k for k in device_map if k == "" or n == k or n.startswith(k + ".")]
        if len(keys) != 1:
            bad[n] = keys
    return bad


def assert_accelerate_compatible(spec, device_map):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # accelerate warns about keys that are parameters, not modules
        check_device_map(spec.modules, device_map)  # raises if a tensor has no device
    assert covered_exactly_once(spec.modules, device_map) == {}
    assert set(device_map) <= spec.module_names()
    for d in device_map.values():
        assert (isinstance(d, int) and not isinstance(d, bool)) or d in ("cpu", "disk")


def layer_devices(plan, replica=0):
    dm = plan.replicas[replica].device_map
    return [dm[f"{LLM}.layers.{i}"] for i in range(32)]


# ---- single ---------------------------------------------------------------------------------------

def test_single_on_one_80gib(llava):
    p = vlmlab.plan("llava-1.5-7b", "1x80GiB", strategy="single")
    assert p.strategy == "single" and p.requested == "single" and p.ok
    assert len(p.replicas) == 1 and p.replicas[0].gpus == [0]
    assert set(p.device_map.values()) == {0}
    assert_accelerate_compatible(llava, p.device_map)
    assert list(p.memory) == [0]
    peak = p.predicted()[0]
    weights = 2 * 7_063_427_072
    assert weights < peak < 80 * GiB  # weights alone underestimate the peak
    assert 14 * GiB < peak < 16 * GiB  # 13.2 GiB weights + KV + activations + CUDA context
    assert p.batch_size == 1 and p.max_new_tokens == 64 and p.dtype == "bfloat16"


def test_single_takes_the_device_with_most_free_memory():
    p = vlmlab.plan("llava-1.5-7b", "rtx3090,h100-80gb", strategy="single")
    assert p.replicas[0].gpus == [1] and set(p.device_map.values()) == {1}


# ---- split ----------------------------------------------------------------------------------------

def test_split_on_two_24gib(llava, split24):
    p = split24
    assert p.strategy == "split" and p.ok and len(p.replicas) == 1 and p.replicas[0].gpus == [0, 1]
    assert_accelerate_compatible(llava, p.device_map)
    pred = p.predicted()
    assert sorted(pred) == [0, 1]
    assert all(pred[i] < 24 * GiB for i in pred)
    assert max(pred.values()) / min(pred.values()) < 1.15  # balanced, not lopsided
    devices = layer_devices(p)
    assert devices == sorted(devices) and set(devices) == {0, 1}  # consecutive layers, consecutive GPUs
    assert min(devices.count(0), devices.count(1)) >= 12
    assert {p.device_map[m] for m in INPUT_GROUP} == {0}  # co-location group on one device
    assert p.device_map["lm_head"] == p.device_map[f"{LLM}.norm"] == 1
    assert any("not faster" in w for w in p.warnings)


def test_split_is_balanced_by_predicted_peak(split24):
    """Moving the boundary layer either way cannot lower the fuller device's predicted peak."""
    devices = layer_devices(split24)
    boundary = devices.index(1)
    best = max(split24.predicted().values())
    left = split24.move(layers=[boundary], to=0)
    right = split24.move(layers=[boundary - 1], to=1)
    assert left.ok and right.ok
    assert max(left.predicted().values()) >= best
    assert max(right.predicted().values()) >= best
    # the input group's activations and the head's logits count: the split is not by weights alone
    w = {i: sum(v for k, v in b.items() if k in ("vision", "projector", "embeddings", "layers", "norm", "head"))
         for i, b in split24.memory.items()}
    assert w[0] != w[1]


def test_split_on_one_device_is_single():
    p = vlmlab.plan("smolvlm-256m", "1x24GiB", strategy="split")
    assert p.strategy == "single" and p.replicas[0].gpus == [0]


def test_split_cpu_workers_have_no_cuda_context():
    p = vlmlab.plan("smolvlm-256m", "2xcpu:1GiB", strategy="split")
    assert p.strategy == "split" and set(p.device_map.values()) == {"cpu"}
    assert all(b["context"] == 0 for b in p.memory.values())


# ---- replicate, hybrid, auto ----------------------------------------------------------------------

def test_replicate_on_two_80gib(llava):
    p = vlmlab.plan("llava-1.5-7b", "2x80GiB", strategy="replicate")
    assert p.strategy == "replicate" and p.ok
    assert [r.gpus for r in p.replicas] == [[0], [1]]
    for i, r in enumerate(p.replicas):
        assert set(r.device_map.values()) == {i}
        assert_accelerate_compatible(llava, r.device_map)
    assert p.predicted()[0] == p.predicted()[1]
    assert p.device_map is p.replicas[0].device_map


def test_replicate_skips_a_device_too_small():
    p = vlmlab.plan("llava-1.5-13b", "h100-80gb,rtx3090", strategy="replicate")  # 13B needs ~27 GiB
    assert [r.gpus for r in p.replicas] == [[0]] and p.strategy == "single"
    assert any("GPU1 not used" in w for w in p.warnings)


def test_hybrid_with_gpus_per_replica():
    spec13 = vlmlab.spec("llava-1.5-13b")
    p = vlmlab.plan("llava-1.5-13b", "4x48GiB", strategy="hybrid", gpus_per_replica=2)
    assert p.strategy == "hybrid" and p.ok
    assert [r.gpus for r in p.replicas] == [[0, 1], [2, 3]]
    for r in p.replicas:
        assert set(r.device_map.values()) == set(r.gpus)
        assert_accelerate_compatible(spec13, r.device_map)
        layers = [r.device_map[f"{LLM}.layers.{i}"] for i in range(40)]
        assert layers == sorted(layers)
        assert {r.device_map[m] for m in INPUT_GROUP} == {r.gpus[0]}
    assert all(v < 48 * GiB for v in p.predicted().values())


def test_hybrid_finds_the_group_size_when_not_given():
    p = vlmlab.plan("llava-1.5-13b", "4x24GiB", strategy="hybrid")  # ~27 GiB: two 24 GiB GPUs per copy
    assert p.strategy == "hybrid" and [r.gpus for r in p.replicas] == [[0, 1], [2, 3]]


def test_hybrid_group_that_leaves_a_gpu_idle():
    p = vlmlab.plan("llava-1.5-13b", "4x48GiB", strategy="hybrid", gpus_per_replica=3)
    assert [r.gpus for r in p.replicas] == [[0, 1, 2]] and p.strategy == "split"
    assert any("GPU3 not used" in w for w in p.warnings)


@pytest.mark.parametrize("k", [0, 5])
def test_hybrid_bad_group_size(k):
    with pytest.raises(ValueError, match=f"gpus_per_replica must be between 1 and 4, got {k}"):
        vlmlab.plan("llava-1.5-7b", "4x24GiB", strategy="hybrid", gpus_per_replica=k)


@pytest.mark.parametrize("box, strategy, groups", [
    ("1x80GiB", "single", [[0]]),
    ("4x80GiB", "replicate", [[0], [1], [2], [3]]),  # a copy fits one GPU: one replica per GPU
    ("4x12GiB", "hybrid", [[0, 1], [2, 3]]),  # a copy needs two 12 GiB GPUs
    ("3x12GiB", "split", [[0, 1]]),  # and the third cannot hold a copy alone
    ("2x10GiB", "split", [[0, 1]]),
])
def test_auto_takes_the_fewest_gpus_per_replica(box, strategy, groups):
    p = vlmlab.plan("llava-1.5-7b", box)  # strategy="auto" is the default
    assert p.requested == "auto" and p.strategy == strategy
    assert [r.gpus for r in p.replicas] == groups
    for i, b in p.memory.items():
        assert sum(b.values()) <= p.hardware.by_index(i).free


def test_auto_on_eight_80gib_for_a_72b_model():
    """The one use of qwen2.5-vl-72b (147 GB of bf16 weights): 4 replicas of 2 GPUs."""
    s = vlmlab.spec("qwen2.5-vl-72b")
    p = vlmlab.plan(s, "8x80GiB")
    assert p.strategy == "hybrid"
    assert [r.gpus for r in p.replicas] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert_accelerate_compatible(s, p.device_map)
    assert {p.device_map[m] for m in ("model.visual", f"{LLM}.embed_tokens")} == {0}
    assert all(v < 80 * GiB for v in p.predicted().values())


# ---- the accelerate device map for every strategy and several families ---------------------------

@pytest.mark.parametrize("name, box, strategy", [
    ("paligemma-3b", "3x4GiB", "split"),  # tied head
    ("qwen2-vl-2b", "3x4GiB", "split"),  # tied head, projector inside the vision tower
    ("blip2-opt-2.7b", "3x4GiB", "split"),  # a parameter (query_tokens) as a device-map key
    ("smolvlm-256m", "2x24GiB", "replicate"),
    ("internvl3-2b", "4x4GiB", "auto"),
])
def test_device_maps_are_accelerate_compatible(name, box, strategy):
    s = vlmlab.spec(name)
    p = vlmlab.plan(name, box, strategy=strategy)
    for r in p.replicas:
        assert_accelerate_compatible(s, r.device_map)
        memory, problems, _ = check(s, r.device_map, {g.index: g for g in p.hardware}, p.workload, p.dtype)
        assert problems == []
        assert {i: sum(b.values()) for i, b in memory.items()} == pytest.approx(
            {i: sum(p.memory[i].values()) for i in r.gpus})
    emb = s.roles["embeddings"][0]
    assert p.device_map[emb] == p.device_map[s.roles["vision"][0]]
    if s.tied_head:
        assert p.device_map[s.roles["head"][0]] == p.device_map[emb]


# ---- a user's device map ---------------------------------------------------------------------------

def test_user_device_map_from_a_plan_is_accepted(split24):
    p = vlmlab.plan("llava-1.5-7b", "2x24GiB", device_map=dict(split24.device_map))
    assert p.strategy == "custom" and p.ok and p.replicas[0].gpus == [0, 1]
    assert p.device_map == split24.device_map
    assert p.predicted() == pytest.approx(split24.predicted())


def test_user_device_map_accepts_cuda_strings(llava):
    p = vlmlab.plan("llava-1.5-7b", "2x24GiB", device_map={"": "cuda:1"})
    assert p.device_map == {"": 1} and p.replicas[0].gpus == [1] and list(p.memory) == [1]


def test_user_device_map_is_validated(split24):
    bad = {**split24.device_map, "model.vision_towr": 1}
    with pytest.raises(DeviceMapError) as err:
        vlmlab.plan("llava-1.5-7b", "2x24GiB", device_map=bad)
    assert len(err.value.problems) == 1 and "did you mean 'model.vision_tower'" in err.value.problems[0]
    # transformers' LLaVA moves image features between devices itself: a warning with the copy's size
    moved = vlmlab.plan("llava-1.5-7b", "2x24GiB", device_map={**split24.device_map, "model.vision_tower": 1})
    assert any("moves the image features" in w for w in moved.warnings)
    with pytest.raises(DeviceMapError, match="over capacity"):
        vlmlab.plan("llava-1.5-7b", "1x8GiB", device_map={"": 0})


@pytest.mark.parametrize("bad", [{}, [("", 0)], "auto"])
def test_user_device_map_must_be_a_dict(bad):
    with pytest.raises(TypeError, match="device_map must be a non-empty dict"):
        vlmlab.plan("llava-1.5-7b", "1x80GiB", device_map=bad)


# ---- nothing fits -----------------------------------------------------------------------------------

def test_plan_error_says_what_is_needed_and_what_would_fit():
    with pytest.raises(PlanError) as err:
        vlmlab.plan("llava-1.5-7b", "2x16GiB", strategy="single", batch_size=16)
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert msg.startswith("llava-1.5-7b in bfloat16 at batch 16 does not fit on one device (GPU0, 16.0 GiB free)")
    assert "a full copy needs 21.9" in msg and "weights 13.2" in msg and "KV cache" in msg
    assert "What would make it fit:" in msg
    assert "dtype='int8': 15." in msg  # a lower dtype (the first that fits)
    assert "batch_size=2: 15." in msg  # the largest power-of-two batch that fits
    assert "strategy='split' over 2 devices" in msg
    assert "more or larger GPUs" in msg


def test_plan_error_when_even_a_split_does_not_fit():
    with pytest.raises(PlanError) as err:
        vlmlab.plan("llava-1.5-7b", "2x4GiB", strategy="split")
    msg = str(err.value)
    assert "does not fit split over all 2 device(s)" in msg and "15.0 GiB" in msg
    assert "about 5 devices of 4.0 GiB" in msg  # 15.0 GiB / (0.9 x 4 GiB) -> 5
    with pytest.raises(PlanError, match="even split over all 1 device"):
        vlmlab.plan("llava-1.5-7b", "1x8GiB")


def test_plan_error_for_replicate_suggests_a_smaller_batch():
    with pytest.raises(PlanError) as err:
        vlmlab.plan("llava-1.5-7b", "2x24GiB", strategy="replicate", batch_size=64)
    msg = str(err.value)
    assert "as a full replica on any device" in msg and "batch_size=" in msg


def test_lower_dtype_fits_where_bf16_does_not():
    p = vlmlab.plan("llava-1.5-7b", "1x8GiB", dtype="4bit")
    assert p.dtype == "int4" and p.strategy == "single"
    assert p.predicted()[0] < 8 * GiB


# ---- arguments ----------------------------------------------------------------------------------------

def test_unknown_strategy():
    with pytest.raises(ValueError,
                       match="unknown strategy 'fastest'; choose one of auto, single, split, replicate, hybrid"):
        vlmlab.plan("llava-1.5-7b", "1x80GiB", strategy="fastest")


@pytest.mark.parametrize("bad", [0, -1, 2.5, "4", None])
def test_bad_batch_size(bad):
    with pytest.raises(ValueError, match=f"batch_size must be a positive integer, got {bad!r}"):
        vlmlab.plan("llava-1.5-7b", "1x80GiB", batch_size=bad)


def test_bad_max_new_tokens_and_dtype():
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        vlmlab.plan("llava-1.5-7b", "1x80GiB", max_new_tokens=0)
    with pytest.raises(ValueError, match="unknown dtype 'fp12'"):
        vlmlab.plan("llava-1.5-7b", "1x80GiB", dtype="fp12")
    with pytest.raises(ValueError, match="unknown GPU"):
        vlmlab.plan("llava-1.5-7b", "2xpotato")


def test_batch_size_grows_the_prediction(split24):
    big = vlmlab.plan("llava-1.5-7b", "2x24GiB", strategy="split", batch_size=16)
    assert big.batch_size == 16
    assert sum(big.predicted().values()) > sum(split24.predicted().values()) + 5 * GiB  # KV cache x16


def test_no_gpu_plans_for_the_cpu(monkeypatch):
    def fake_gpus(spec=None):
        if spec is None:
            return Hardware([], "none", "No GPU found on this machine: test.")
        return vlmlab.gpus(spec)

    monkeypatch.setattr(planner_module, "get_gpus", fake_gpus)
    p = vlmlab.plan("smolvlm-256m")
    assert p.hardware.is_cpu and p.strategy == "single"
    assert set(p.device_map.values()) == {"cpu"}
    assert any("No GPU found" in w and "Planned for the CPU" in w for w in p.warnings)
    assert p.memory[0]["context"] == 0


def test_gpu_indices_select_from_this_machine(monkeypatch):
    machine = vlmlab.gpus("a100-40gb,h100-80gb,rtx3090")
    monkeypatch.setattr(planner_module, "get_gpus", lambda spec=None: machine if spec is None else vlmlab.gpus(spec))
    p = vlmlab.plan("llava-1.5-7b", [1, 2], strategy="single")
    assert [g.index for g in p.hardware] == [1, 2]
    assert p.replicas[0].gpus == [1]  # the H100, the most free of the two chosen


def test_hybrid_without_gpus_per_replica_makes_replicas_of_split_groups():
    p = vlmlab.plan("llava-1.5-7b", gpus="4x24GiB", strategy="hybrid", batch_size=4)
    assert p.strategy == "hybrid"
    assert [r.gpus for r in p.replicas] == [[0, 1], [2, 3]]


def test_hybrid_needs_four_devices_and_gpus_per_replica_only_for_hybrid():
    with pytest.raises(ValueError, match="at least 4 devices"):
        vlmlab.plan("llava-1.5-7b", gpus="2x80GiB", strategy="hybrid")
    with pytest.raises(ValueError, match="gpus_per_replica applies to strategy 'hybrid'"):
        vlmlab.plan("llava-1.5-7b", gpus="2x80GiB", strategy="split", gpus_per_replica=2)


def test_advice_combines_a_lower_dtype_with_a_split_when_neither_alone_fits():
    with pytest.raises(PlanError) as err:
        vlmlab.plan("llava-1.5-7b", gpus="2x4GiB", strategy="split")
    assert "dtype='int4' with strategy='split' over 2 devices" in str(err.value)
    assert vlmlab.plan("llava-1.5-7b", gpus="2x4GiB", strategy="split", dtype="int4").ok
