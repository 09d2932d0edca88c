"""vlmlab.plan.devicemap: every validation message, expand(), normalise_device(), memory per device."""
import pytest

import vlmlab
from vlmlab.plan.devicemap import DeviceMapError, check, expand, normalise_device, owner_of
from vlmlab.model.memory import Workload

LLM = "model.language_model"
EMB = 32064 * 4096
LAYER = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096  # one Llama-7B decoder layer
VISION, PROJ = 303_507_456, 20_979_712
WORK = Workload()


@pytest.fixture(scope="module")
def llava():
    return vlmlab.spec("llava-1.5-7b")


@pytest.fixture(scope="module")
def two():
    return {g.index: g for g in vlmlab.gpus("2x24GiB")}


def by_hand():
    """LLaVA-1.5-7B split by hand: input group and layers 0-15 on GPU0, the rest on GPU1."""
    dm = {"model.vision_tower": 0, "model.multi_modal_projector": 0, f"{LLM}.embed_tokens": 0,
          f"{LLM}.rotary_emb": 0}
    dm.update({f"{LLM}.layers.{i}": 0 if i < 16 else 1 for i in range(32)})
    dm.update({f"{LLM}.norm": 1, "lm_head": 1})
    return dm


def problems(spec, dm, devices):
    return check(spec, dm, devices, WORK, "bfloat16")[1]


def test_a_valid_split(llava, two):
    memory, probs, warnings = check(llava, by_hand(), two, WORK, "bfloat16")
    assert probs == [] and warnings == []
    assert sorted(memory) == [0, 1]
    gpu0, gpu1 = memory[0], memory[1]
    # bf16 weights, 2 bytes per parameter
    assert gpu0["vision"] == 2 * VISION and gpu0["projector"] == 2 * PROJ and gpu0["embeddings"] == 2 * EMB
    assert gpu0["layers"] == 2 * 16 * LAYER and gpu0["head"] == 0 and gpu0["logits"] == 0
    assert gpu1["layers"] == 2 * 16 * LAYER and gpu1["norm"] == 2 * 4096 and gpu1["head"] == 2 * EMB
    assert gpu1["vision"] == 0 and gpu1["logits"] > 0
    # 16 layers of KV cache on each: 2 x 1 x (16 + 576 + 64) x 32 heads x 128 x 2 bytes per layer
    assert gpu0["kv_cache"] == gpu1["kv_cache"] == 16 * 2 * 656 * 32 * 128 * 2


def test_whole_model_key(llava):
    one = {g.index: g for g in vlmlab.gpus("1x80GiB")}
    memory, probs, _ = check(llava, {"": 0}, one, WORK, "bfloat16")
    assert probs == [] and list(memory) == [0]
    assert memory[0]["head"] == 2 * EMB and memory[0]["layers"] == 2 * 32 * LAYER
    # "cuda:0" and "0" are the same device
    assert problems(llava, {"": "cuda:0"}, one) == [] and problems(llava, {"": "0"}, one) == []


def test_unknown_module_with_did_you_mean(llava, two):
    dm = by_hand()
    dm[f"{LLM}.layer.3"] = dm.pop(f"{LLM}.layers.3")
    probs = problems(llava, dm, two)
    assert any(f"unknown module '{LLM}.layer.3'" in p and f"did you mean '{LLM}.layers.3'?" in p
               and "llava-1.5-7b has no module or parameter of that name" in p for p in probs)
    # and, since the real layer 3 is now unmapped:
    assert any(f"not covered by the device map: '{LLM}.layers.3' (9 parameter tensors)" in p for p in probs)


def test_unknown_module_without_close_match(llava, two):
    probs = problems(llava, {**by_hand(), "zzzzzz": 0}, two)
    assert len(probs) == 1 and "unknown module 'zzzzzz'" in probs[0] and "did you mean" not in probs[0]


def test_module_not_covered(llava, two):
    dm = by_hand()
    del dm["lm_head"]
    assert problems(llava, dm, two) == [
        "not covered by the device map: 'lm_head' (1 parameter tensors); map every module to a device"]


def test_many_modules_not_covered_are_summarised(llava, two):
    # no layer at all: the highest uncovered module is named, with the count of its parameters
    dm = {k: v for k, v in by_hand().items() if ".layers." not in k}
    assert problems(llava, dm, two) == [
        f"not covered by the device map: '{LLM}.layers' (288 parameter tensors); map every module to a device"]  # 32 x 9
    # ten separate layers missing: eight are named, then an ellipsis
    dm = {k: v for k, v in by_hand().items() if k not in {f"{LLM}.layers.{i}" for i in range(0, 20, 2)}}
    (p,) = problems(llava, dm, two)
    assert p.count(f"'{LLM}.layers.") == 8 and " … (90 parameter tensors)" in p


def test_module_covered_twice(llava, two):
    dm = {**by_hand(), f"{LLM}.layers.3.mlp": 0}
    assert problems(llava, dm, two) == [
        f"'{LLM}.layers.3.mlp' is covered twice: it is also inside '{LLM}.layers.3'; map each module once"]
    probs = problems(llava, {"": 0, "lm_head": 0}, two)
    assert probs == ["'lm_head' is covered twice: it is also inside 'the whole model'; map each module once"]


def test_device_that_does_not_exist(llava, two):
    dm = {**by_hand(), "lm_head": 5}
    probs = problems(llava, dm, two)
    assert "'lm_head' is mapped to GPU 5, which does not exist; the devices are [0, 1]" in probs


def test_value_that_is_not_a_device(llava, two):
    probs = problems(llava, {**by_hand(), "lm_head": "gpu1"}, two)
    assert any(p.startswith("'lm_head': 'gpu1' is not a device") for p in probs)


def test_colocation_broken(llava, two):
    dm = {**by_hand(), "model.vision_tower": 1}  # vision tower on GPU1, projector + embeddings on GPU0
    # transformers' LLaVA moves the image features itself (measured on an H200 with transformers 5.17):
    # not an error, a warning with what the copy costs
    memory, probs, warnings = check(llava, dm, two, WORK, "bfloat16")
    assert probs == []
    (w,) = warnings
    assert w.startswith("vision tower, projector and embeddings on different devices (vision on GPU1, projector on "
                        "GPU0, embeddings on GPU0)")
    # the larger of the tower's output (577 x 1024) and the projected features (576 x 4096), in bf16
    assert f"about {WORK.batch_size * 576 * 4096 * 2 / 2**20:,.1f} MiB per batch of 1" in w
    from dataclasses import replace

    remote = replace(llava, family=replace(llava.family, moves_image_features=False))  # as remote code
    (p,) = problems(remote, dm, two)
    assert p.startswith("co-location broken: vision on GPU1, projector on GPU0, embeddings on GPU0.")
    assert "Expected all tensors to be on the same device" in p


def test_tied_head_must_stay_with_the_embeddings(two):
    pg = vlmlab.spec("paligemma-3b")
    dm = {"": 0}
    dm = expand(pg, dm, "lm_head")
    assert problems(pg, dm, two) == []
    dm["lm_head"] = 1
    (p,) = problems(pg, dm, two)
    assert "co-location broken" in p and "head (tied to the embeddings) on GPU1" in p and "embeddings on GPU0" in p


def test_no_split_block_split(llava, two):
    dm = expand(llava, by_hand(), f"{LLM}.layers.3.mlp")
    assert problems(llava, dm, two) == []  # expanded but still together
    dm[f"{LLM}.layers.3.mlp"] = 1  # self_attn on GPU0, mlp on GPU1
    assert problems(llava, dm, two) == [
        f"'{LLM}.layers.3' (LlamaDecoderLayer) is split across GPU0 and GPU1; this block must stay on one device"]


def test_device_over_capacity(llava):
    small = {g.index: g for g in vlmlab.gpus("2x8GiB")}
    (p,) = problems(llava, {"": 0}, small)
    assert p.startswith("GPU0 is over capacity: it needs 15.0") and p.endswith("but has 8.0 GiB")
    # a whole model on one GPU runs the fast path: a static cache, 2 % slack (memory.STATIC_SLACK)
    assert "(weights 13.2, KV cache 0.3, activations 0.1, context 1.4 GiB)" in p


def test_offloading_warns_and_costs_no_gpu_memory(llava, two):
    dm = {**by_hand(), **{f"{LLM}.layers.{i}": "cpu" for i in range(16, 32)}}
    memory, probs, warnings = check(llava, dm, two, WORK, "bfloat16")
    assert probs == []
    assert len(warnings) == 1 and "offloaded to cpu/disk" in warnings[0]
    assert memory[1]["layers"] == 0 and memory[1]["head"] == 2 * EMB


def test_device_map_error_lists_each_problem():
    err = DeviceMapError(["first thing", "second thing"])
    assert isinstance(err, ValueError)
    assert err.problems == ["first thing", "second thing"]
    assert str(err) == "the device map is not valid:\n  - first thing\n  - second thing"


# ---- expand, owner_of, normalise_device ---------------------------------------------------------

def test_expand_the_whole_model_down_to_a_sub_module(llava, two):
    original = {"": 0}
    dm = expand(llava, original, f"{LLM}.layers.3.mlp")
    assert original == {"": 0}  # not modified in place
    assert dm[f"{LLM}.layers.3.mlp"] == 0
    for sibling in ("self_attn", "input_layernorm", "post_attention_layernorm"):
        assert dm[f"{LLM}.layers.3.{sibling}"] == 0
    assert dm[f"{LLM}.layers.2"] == dm[f"{LLM}.layers.4"] == 0
    assert dm["model.vision_tower"] == dm["lm_head"] == dm[f"{LLM}.norm"] == 0
    assert "" not in dm and f"{LLM}.layers.3" not in dm and f"{LLM}.layers" not in dm
    assert set(dm.values()) == {0}
    assert problems(llava, dm, two) == []  # still covers everything exactly once


def test_expand_keeps_the_device_of_the_split_key(llava):
    dm = expand(llava, by_hand(), f"{LLM}.layers.20.self_attn.q_proj")
    assert dm[f"{LLM}.layers.20.self_attn.q_proj"] == 1 and dm[f"{LLM}.layers.20.self_attn.k_proj"] == 1
    assert dm[f"{LLM}.layers.20.mlp"] == 1 and dm[f"{LLM}.layers.3"] == 0


def test_expand_an_existing_key_or_an_uncovered_name(llava):
    dm = by_hand()
    assert expand(llava, dm, "lm_head") == dm
    del dm["lm_head"]
    with pytest.raises(KeyError, match="'lm_head' is not covered by the device map"):
        expand(llava, dm, "lm_head")


def test_owner_of_is_the_longest_prefix():
    dm = {"": 0, "a": 1, "a.b": 2}
    assert owner_of("a.b.c.weight", dm) == "a.b"
    assert owner_of("a.bc.weight", dm) == "a"  # "a.b" is not a prefix of "a.bc"
    assert owner_of("z.weight", dm) == ""
    assert owner_of("z.weight", {"a": 1}) is None


@pytest.mark.parametrize("value, device", [
    (0, 0), (3, 3), ("0", 0), ("1", 1), ("cuda:1", 1), ("CUDA:2", 2), (" cuda:0 ", 0), ("cuda", 0),
    ("cpu", "cpu"), ("CPU", "cpu"), ("disk", "disk"),
])
def test_normalise_device(value, device):
    assert normalise_device(value) == device


@pytest.mark.parametrize("bad", [True, False, "gpu", "cuda:x", "tpu", "", "-1"])
def test_normalise_device_rejects(bad):
    with pytest.raises(ValueError, match="is not a device"):
        normalise_device(bad)
