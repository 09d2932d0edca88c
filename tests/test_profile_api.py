"""vlmlab.profile(): the API that %vlm profile and the tutorials call."""
from __future__ import annotations

import json

import pytest

import vlmlab


def test_profile_of_the_bundled_captioner_has_stages_throughput_and_memory():
    prof = vlmlab.profile(progress=False, gpus="cpu")
    d = prof.to_dict(samples=False, calls=False)
    json.dumps(d, default=str)
    assert {"vision encode", "prefill", "decode"} <= set(d["latency"])
    assert d["latency"]["prefill"]["calls"] >= 1 and d["latency"]["decode"]["calls"] >= 1
    assert d["images"] == 8 and prof.images_per_s > 0
    assert len(prof.samples) > 0


def test_profile_with_random_weights_runs_synthetic_prompts_and_unloads(tmp_path):
    from transformers import LlavaConfig

    cfg = LlavaConfig(vision_config=dict(model_type="clip_vision_model", hidden_size=32, image_size=28,
                                         intermediate_size=64, num_attention_heads=2, num_hidden_layers=2, patch_size=14),
                      text_config=dict(model_type="llama", hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                       num_hidden_layers=2, num_key_value_heads=1, vocab_size=300),
                      image_token_index=299)
    cfg.architectures = ["LlavaForConditionalGeneration"]
    cfg.save_pretrained(tmp_path)
    before = len(vlmlab.loaded())
    prof = vlmlab.profile(str(tmp_path), random_weights=True, n_images=4, batch_size=2, max_new_tokens=3, gpus="cpu")
    assert prof.to_dict(samples=False, calls=False)["images"] == 4
    assert len(vlmlab.loaded()) == before


def test_profile_refuses_a_replicated_plan_and_points_to_bench():
    with pytest.raises(ValueError, match="vlmlab.bench"):
        vlmlab.profile(gpus="2xcpu", strategy="replicate")
