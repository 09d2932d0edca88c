"""Random-weight dry runs (bench(random_weights=True)) for every family the tiny models cover: the 8
catalogue families (LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Idefics3/SmolVLM, PaliGemma, BLIP-2,
InternVL) and 3 outside the catalogue (Gemma 3, Idefics2, Mllama). Each builds its model from the
folder's config with random weights and generates from vlmlab's dummy inputs (the family's own
processor's prompt layout and pixel inputs); the GPU numbers for these paths are in
benchmarks/results/gpu_memory_any.txt."""
import pytest
import torch

import vlmlab
from vlmlab.model.dummy_inputs import _is_mask

CATALOGUE_FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "paligemma", "blip2",
                      "internvl")
OUTSIDE = ("gemma3", "idefics2", "mllama")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("family", CATALOGUE_FAMILIES + OUTSIDE)
def test_random_weight_bench_runs(tiny_vlms, family):
    result = vlmlab.bench(str(tiny_vlms[family]), strategies=["single"], batch_sizes=[2], gpus="cpu",
                          random_weights=True, n_images=2, max_new_tokens=2, progress=False, isolate=False)
    row = result.rows[0]
    assert row.get("error") is None and row["images"] == 2 and row["images_per_s"] > 0


def test_a_float_mask_is_repeated_not_drawn_at_random():
    assert _is_mask(torch.ones(1, 3, 4, 4))
    mixed = torch.ones(1, 3, 4, 4)
    mixed[..., 0] = 0
    assert _is_mask(mixed)
    assert not _is_mask(torch.zeros(1, 3, 4, 4))  # padding images are all zeros: drawn like pixels
    assert not _is_mask(torch.full((1, 3, 4, 4), -0.06))  # normalised pixels
