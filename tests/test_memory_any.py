"""Memory terms read from what a model is (issue 10): Mllama's tiles, global layers and kept states,
a projector wider than its tower (Idefics2), the local tokenizer keeping the config's special ids,
and one recorded H200 run predicted again from its config (benchmarks/gpu_memory_any_fit.py)."""
import sys
from pathlib import Path

import pytest

import vlmlab
from tests.config_zoo import build_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mllama():
    return vlmlab.spec(build_config("mllama"))


def test_mllama_tower_counts_its_tiles_global_layers_and_kept_states(mllama):
    vc = mllama.config.vision_config
    d = mllama.dims
    assert mllama.family.keeps_vision_states  # it concatenates intermediate_layers_indices' states
    assert d.vision_layers == vc.num_hidden_layers + vc.num_global_layers
    patches = (vc.image_size // vc.patch_size) ** 2
    assert d.vision_tokens == vc.max_num_tiles * (patches + 1)  # a class token per tile
    cross = [c for c in d.kv if c.kind == "cross"]
    assert cross, "the cross-attention layers cache K/V of the image tokens"


def test_idefics2_projector_is_read_from_its_layers():
    ms = vlmlab.spec(build_config("idefics2"))
    text = ms.config.text_config
    # modality_projection: gate_proj and up_proj take the tower's features to the text MLP width
    assert ms.dims.projector_in == ms.config.vision_config.hidden_size
    assert ms.dims.projector_width == text.intermediate_size and ms.dims.projector_wide == 2


def test_local_tokenizer_keeps_the_ids_the_config_gives():
    # transformers' default idefics2 config: image id 32001 beyond its vocab of 32000; grown to 32002 a fresh
    # marker token must not take 32001 before <image> asks for it
    from vlmlab.model import image_tokens

    config = build_config("idefics2")
    config.text_config.vocab_size = 32002
    counted = image_tokens.count(config, (1024, 768))
    assert counted.source.startswith("processor") and counted.per_image == 64
    assert counted.prompt_ids.count(config.image_token_id) == 64 and max(counted.prompt_ids) < 32002


def test_a_recorded_h200_run_is_predicted_within_5_percent():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_memory_any_fit as fit

    runs = list(fit.rows(ROOT / "benchmarks" / "results" / "gpu_memory_any.jsonl"))
    row = next(r for r in reversed(runs) if r["model"] == "qwen2-vl-2b" and r["batch"] == 64)
    _, breakdown, context = fit.predict(row)
    measured = row["max_reserved_gib"] + context / 1024**3
    assert abs(sum(breakdown.values()) / 1024**3 - measured) / measured < 0.05
