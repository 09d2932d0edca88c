"""vlmlab.model.memory: every term of the memory model pinned on a small hand-made config.

The numbers below are worked out by hand (the arithmetic is in the comments), not by calling the
formulas under test, so a changed formula fails here.
"""
import pytest
import torch

import vlmlab
from vlmlab.model import memory
from vlmlab.model.memory import (DeviceLoad, Workload, canonical_dtype, compute_bytes, device_memory,
                           embedding_activation_bytes, kv_bytes_per_layer, logits_bytes,
                           prefill_activation_bytes, projector_activation_bytes, rotary_fp32_bytes,
                           vision_activation_bytes, weight_bytes)
from vlmlab.model.spec import Dims, Unit

GiB = 1024**3

# A toy VLM: text hidden 8, MLP 20, 2 layers, 2 heads sharing 1 KV head of dim 4, vocab 100;
# a vision tower of width 6, MLP 10, 3 layers, 5 tokens per image, 4 of them reaching the LM.
DIMS = Dims(hidden=8, intermediate=20, layers=2, heads=2, kv_heads=1, head_dim=4, vocab=100,
            vision_hidden=6, vision_intermediate=10, vision_layers=3, vision_heads=2,
            vision_tokens=5, image_tokens=4)
# batch 2, prompt 5 text tokens + 1 image x 4 tokens = 9 prefill tokens, + 3 new = 12 tokens at the end
WORK = Workload(batch_size=2, max_new_tokens=3, prompt_tokens=5, images_per_prompt=1)

INPUT = Unit("input", ["vision", "proj", "emb"], params={"vision": 1000, "projector": 200, "embeddings": 800},
             linear={"vision": 900, "projector": 200})
LAYERS = [Unit(f"layer {i}", [f"layers.{i}"], params={"layers": 500}, linear={"layers": 480}, layer=i)
          for i in range(2)]
NORM = Unit("norm", ["norm"], params={"norm": 8})
HEAD = Unit("head", ["head"], params={"head": 800}, linear={"head": 800})
ALL = [INPUT, *LAYERS, NORM, HEAD]


def test_token_counts():
    assert WORK.prefill_tokens(DIMS) == 9  # 5 + 1 * 4
    assert WORK.total_tokens(DIMS) == 12  # 9 + 3
    two_images = Workload(batch_size=2, max_new_tokens=3, prompt_tokens=5, images_per_prompt=2)
    assert two_images.prefill_tokens(DIMS) == 13 and two_images.total_tokens(DIMS) == 16


# ---- weights ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, expected", [
    ("float32", {"vision": 4000, "projector": 800, "embeddings": 3200}),  # 4 bytes each
    ("bfloat16", {"vision": 2000, "projector": 400, "embeddings": 1600}),  # 2 bytes each
    ("float16", {"vision": 2000, "projector": 400, "embeddings": 1600}),
    # int8: nn.Linear weights 1 byte, the rest (biases, norms, conv, embeddings) stays 16-bit:
    # vision 900 * 1 + 100 * 2 = 1100; projector 200 * 1 = 200; embeddings 800 * 2 = 1600
    ("int8", {"vision": 1100, "projector": 200, "embeddings": 1600}),
    # int4 (NF4, one 8-bit absmax per 64 weights): 0.5 + 1/64 = 0.515625 bytes per linear weight:
    # vision 900 * 0.515625 + 100 * 2 = 464.0625 + 200 = 664.0625; projector 200 * 0.515625 = 103.125
    ("int4", {"vision": 664.0625, "projector": 103.125, "embeddings": 1600}),
])
def test_weight_bytes_of_the_input_unit(dtype, expected):
    assert weight_bytes(INPUT, dtype) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("dtype, layer, head, norm", [
    ("float32", 2000, 3200, 32),
    ("bfloat16", 1000, 1600, 16),
    ("int8", 480 + 20 * 2, 1600, 16),  # the head is an nn.Linear but stays 16-bit: 800 * 2
    ("int4", 480 * 0.515625 + 20 * 2, 1600, 16),  # 247.5 + 40 = 287.5
])
def test_weight_bytes_of_layers_head_and_norm(dtype, layer, head, norm):
    assert weight_bytes(LAYERS[0], dtype) == pytest.approx({"layers": layer})
    assert weight_bytes(HEAD, dtype) == pytest.approx({"head": head})
    assert weight_bytes(NORM, dtype) == pytest.approx({"norm": norm})


def test_quantised_weights_of_a_real_model():
    """LLaVA-1.5-7B by hand: which parameters are nn.Linear weights decides what int8/int4 shrink."""
    s = vlmlab.spec("llava-1.5-7b")
    total = 7_063_427_072
    head = 32064 * 4096  # untied lm_head, kept in 16 bits
    linear = (24 * (4 * 1024**2 + 2 * 1024 * 4096)  # CLIP: q,k,v,o + fc1,fc2 per layer
              + 1024 * 4096 + 4096 * 4096  # projector
              + 32 * (4 * 4096**2 + 3 * 4096 * 11008))  # Llama: q,k,v,o + gate,up,down per layer

    def weights(dtype):
        return sum(sum(weight_bytes(u, dtype).values()) for u in s.units)

    assert weights("float32") == 4 * total
    assert weights("bfloat16") == 2 * total  # 13.16 GiB, the "13.2 GiB of weights" measured
    assert weights("int8") == linear * 1 + (total - linear) * 2
    assert weights("int4") == pytest.approx(linear * (0.5 + 1 / 64) + (total - linear) * 2)


# ---- KV cache, activations, logits --------------------------------------------------------------

def test_kv_cache():
    # 2 (K and V) x batch 2 x 12 tokens x 1 KV head x head_dim 4 x 2 bytes = 384 per layer
    assert kv_bytes_per_layer(DIMS, WORK, "bfloat16") == 384
    assert kv_bytes_per_layer(DIMS, WORK, "float32") == 768  # 4 bytes
    assert kv_bytes_per_layer(DIMS, WORK, "int4") == 384  # quantised weights, 16-bit cache
    # more tokens: 2 images per prompt -> 16 tokens: 2 x 2 x 16 x 1 x 4 x 2 = 512
    assert kv_bytes_per_layer(DIMS, Workload(2, 3, 5, 2), "bfloat16") == 512
    # grouped-query attention counts KV heads, not query heads: 4 KV heads -> 4x
    gqa = Dims(**{**vars(DIMS), "kv_heads": 4})
    assert kv_bytes_per_layer(gqa, WORK, "bfloat16") == 4 * 384


def test_compute_bytes():
    assert compute_bytes("float32") == 4
    assert [compute_bytes(d) for d in ("bfloat16", "float16", "int8", "int4")] == [2, 2, 2, 2]


def test_vision_activations():
    # 2 images; one hidden state = 2 x 5 tokens x 6 wide x 2 bytes = 120;
    # MLP temporaries = 2 x 5 x (2 x 10) x 2 = 400
    # keeping every hidden state (LLaVA's feature layer -2): (3 layers + 1) x 120 + 400 = 880
    assert vision_activation_bytes(DIMS, WORK, "bfloat16", keeps_hidden_states=True) == 880
    # otherwise the input and output of one layer: 2 x 120 + 400 = 640
    assert vision_activation_bytes(DIMS, WORK, "bfloat16", keeps_hidden_states=False) == 640
    assert vision_activation_bytes(DIMS, WORK, "float32", keeps_hidden_states=False) == 1280


def test_projector_activations():
    # a gated projector (two layers 30 wide) reading the tower's 6-wide features: 2 images x 5 tokens = 10 rows
    # x 30 x (2 + 1 activation) x 2 bytes = 1800, more than the tower's MLP (400): 2 x 120 + 1800 = 2040
    gated = Dims(**{**vars(DIMS), "projector_in": 6, "projector_width": 30, "projector_wide": 2})
    assert projector_activation_bytes(gated, WORK, "bfloat16") == 1800
    assert vision_activation_bytes(gated, WORK, "bfloat16", keeps_hidden_states=False) == 2040
    # one reading 2 merged tokens per row (input 12 = 2 x 6): 5 rows x 30 x 3 x 2 = 900
    merged = Dims(**{**vars(gated), "projector_in": 12})
    assert projector_activation_bytes(merged, WORK, "bfloat16") == 900
    assert projector_activation_bytes(DIMS, WORK, "bfloat16") == 0  # no projector layers read


def test_rotary_tower_keeps_its_float32_blocks_when_it_is_the_peak():
    rotary = Dims(**{**vars(DIMS), "vision_rotary": True})
    # 2 images x 5 tokens x 6 wide x ROTARY_FP32 (5) x 4 bytes = 1200
    assert rotary_fp32_bytes(rotary, WORK) == 1200 and rotary_fp32_bytes(DIMS, WORK) == 0
    # tower alone: 2 x 120 kept + attention 2 x 5 x 6 x (3 x 2 + 5 x 4) = 1560 -> 1800, + embeddings 864 = 2664
    alone = device_memory([INPUT], rotary, WORK, "bfloat16", is_cuda=True)
    assert alone["activations"] == 2664
    assert alone["context"] == pytest.approx(memory.CUDA_CONTEXT + memory.ALLOCATOR_FLOOR
                                             + memory.ALLOCATOR_SLACK * 2664 + 1200)
    # with the layers the prefill (3504) plus the KV cache (768) outgrow the tower: no extra slack
    whole = device_memory(ALL, rotary, WORK, "bfloat16", is_cuda=True)
    assert whole["context"] == pytest.approx(memory.CUDA_CONTEXT + memory.ALLOCATOR_FLOOR
                                             + memory.ALLOCATOR_SLACK * (768 + 3504 + 1600))


def test_embedding_activations():
    # embedded prompt + image features + merged copy: 3 x batch 2 x 9 tokens x 8 x 2 bytes = 864
    assert embedding_activation_bytes(DIMS, WORK, "bfloat16") == 864


def test_prefill_activations():
    # 2 x 9 = 18 tokens x (4 x 8 residual/norms + max(3 x 20 MLP, 6 x 8 attention) = 92) x 2 bytes = 3312
    assert prefill_activation_bytes(DIMS, WORK, "bfloat16") == 3312
    # a narrow MLP: attention is the larger: 18 x (32 + max(3 x 10, 48)) x 2 = 18 x 80 x 2 = 2880
    narrow = Dims(**{**vars(DIMS), "intermediate": 10})
    assert prefill_activation_bytes(narrow, WORK, "bfloat16") == 2880


def test_logits():
    # last position only, float32, plus a processed copy: 2 x batch 2 x vocab 100 x 4 bytes = 1600
    assert logits_bytes(DIMS, WORK) == 1600
    assert logits_bytes(DIMS, Workload(batch_size=8)) == 6400


# ---- one device, all terms together --------------------------------------------------------------

def test_context_constants_are_the_calibrated_ones():
    assert 1 * GiB <= memory.CUDA_CONTEXT <= 2 * GiB  # measured 1.27-1.29 GiB
    assert 0.15 <= memory.ALLOCATOR_SLACK <= 0.4  # measured 15-37 % of the dynamic memory over 9 families
    assert 64 * 1024**2 <= memory.ALLOCATOR_FLOOR <= 512 * 1024**2  # 0.1-0.5 GiB reserved-minus-allocated at batch 1


def test_whole_model_on_a_gpu():
    b = device_memory(ALL, DIMS, WORK, "bfloat16", is_cuda=True, keeps_vision_states=False)
    assert b["vision"] == 2000 and b["projector"] == 400 and b["embeddings"] == 1600
    assert b["layers"] == 2000 and b["norm"] == 16 and b["head"] == 1600 and b["other"] == 0
    assert b["kv_cache"] == 768  # 2 layers x 384
    # transient peak: max(vision 640 + embeddings 864 = 1504, prefill 3312 + half a layer's KV 192 = 3504)
    assert b["activations"] == 3504
    assert b["logits"] == 1600
    # context + slack on the dynamic part: 768 + 3504 + 1600 = 5872
    slack = memory.ALLOCATOR_FLOOR + memory.ALLOCATOR_SLACK * 5872
    assert b["context"] == pytest.approx(memory.CUDA_CONTEXT + slack)
    assert sum(b.values()) == pytest.approx(7616 + 5872 + memory.CUDA_CONTEXT + slack)
    assert set(b) == set(memory.COMPONENTS)


def test_cpu_device_has_no_cuda_context():
    b = device_memory(ALL, DIMS, WORK, "bfloat16", is_cuda=False)
    assert b["context"] == 0
    assert sum(b.values()) == 7616 + 5872  # weights (2000+400+1600+2000+16+1600) + KV + activations + logits


def test_input_group_alone():
    """The first device of a split: vision + embeddings activations, no KV cache, no logits."""
    b = device_memory([INPUT], DIMS, WORK, "bfloat16", is_cuda=True, keeps_vision_states=True)
    assert b["kv_cache"] == 0 and b["logits"] == 0 and b["layers"] == 0
    assert b["activations"] == 880 + 864  # vision (all hidden states kept) + embeddings
    assert b["context"] == pytest.approx(memory.CUDA_CONTEXT + memory.ALLOCATOR_FLOOR + memory.ALLOCATOR_SLACK * 1744)


def test_layers_and_head_alone():
    """The last device of a split: one layer's KV cache, prefill activations, the logits."""
    b = device_memory([LAYERS[1], NORM, HEAD], DIMS, WORK, "bfloat16", is_cuda=False)
    assert b["kv_cache"] == 384 and b["activations"] == 3312 + 192 and b["logits"] == 1600
    assert b["vision"] == 0 and b["embeddings"] == 0


def test_tied_head_in_the_input_unit_brings_the_logits():
    tied_input = Unit("input", [], params={**INPUT.params, "head": 0}, linear=dict(INPUT.linear))
    b = device_memory([tied_input], DIMS, WORK, "bfloat16", is_cuda=False)
    assert b["logits"] == 1600 and b["head"] == 0


def test_device_load_copy_is_independent():
    load = DeviceLoad(DIMS, WORK, "bfloat16", is_cuda=False).add(INPUT)
    before = load.breakdown()
    copy = load.copy()
    copy.add(LAYERS[0]).add(HEAD)
    assert load.breakdown() == before  # the original did not change
    assert load.layers == 0 and not load.has_head and load.weights["layers"] == 0
    assert copy.layers == 1 and copy.has_head and copy.has_input and copy.weights["layers"] == 1000
    assert copy.total() == pytest.approx(load.total() + 1000 + 1600 + 384 + 1600 + (3312 + 192 - 1504))
    # and a copy of the copy does not share the weights dict either
    copy2 = copy.copy()
    copy2.weights["vision"] += 1
    assert copy.weights["vision"] == 2000


# ---- dtypes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("alias, canonical", [
    ("bf16", "bfloat16"), ("BF16", "bfloat16"), ("bfloat16", "bfloat16"), (torch.bfloat16, "bfloat16"),
    ("fp16", "float16"), ("half", "float16"), (torch.float16, "float16"),
    ("fp32", "float32"), ("float", "float32"), (torch.float32, "float32"),
    ("int8", "int8"), ("8bit", "int8"), ("int4", "int4"), ("4bit", "int4"), ("nf4", "int4"),
    ("auto", "bfloat16"), ("torch.float16", "float16"),
])
def test_canonical_dtype(alias, canonical):
    assert canonical_dtype(alias) == canonical


@pytest.mark.parametrize("bad", ["fp12", "int3", torch.int64, ""])
def test_unknown_dtype(bad):
    with pytest.raises(ValueError, match=r"unknown dtype .*use one of float32, bfloat16, float16, int8, int4"):
        canonical_dtype(bad)


# ---- the calibration run -------------------------------------------------------------------------

# NVML peaks measured on 2x H200 (benchmarks/results/gpu_memory_calibration.txt), GiB, 32 new tokens
MEASURED = [
    ("llava-1.5-7b", 16, "single", [22.12]),
    ("llava-1.5-7b", 16, "split", [12.14, 12.41]),
    ("llava-1.5-7b", 4, "single", [16.34]),
    ("llava-1.5-7b", 4, "split", [8.86, 9.00]),
    ("qwen2.5-vl-7b", 16, "single", [18.53]),
]


@pytest.mark.parametrize("model, batch, strategy, measured", MEASURED)
def test_prediction_within_10_percent_of_the_measured_peak(model, batch, strategy, measured):
    # the calibration run fed Qwen a 448x448 image (256 image tokens)
    p = vlmlab.plan(model, "2xh200", strategy, batch_size=batch, max_new_tokens=32, image_size=(448, 448))
    predicted = [v / GiB for v in p.predicted().values()]
    assert len(predicted) == len(measured)
    for pred, meas in zip(predicted, measured):
        assert abs(pred - meas) / meas < 0.10, (pred, meas)
