"""vlmlab.profile(): the API that %vlm profile and the tutorials call."""
from __future__ import annotations

import json

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


def test_profile_of_a_replicated_plan_merges_each_worker_profile_on_one_time_axis():
    prof = vlmlab.profile(gpus="2xcpu", strategy="replicate", batch_size=2, progress=False)
    assert len(prof.replicas) == 2
    assert prof.images == 8 == sum(r.images for r in prof.replicas)
    assert all(r.images > 0 for r in prof.replicas)  # both workers captioned
    # two CPU workers would both be "cpu": each keeps its own curve and peak
    assert prof.devices == ["cpu/r0", "cpu/r1"]
    assert {s["device"] for s in prof.samples} == {"cpu/r0", "cpu/r1"}
    assert set(prof.peak()) == {"cpu/r0", "cpu/r1"} and all(v > 0 for v in prof.peak().values())
    assert sum(r.latency["prefill"]["calls"] for r in prof.replicas) == prof.latency["prefill"]["calls"] >= 2
    # time 0 is the go signal: every step falls inside the run's wall time (plus clock slack)
    assert all(-0.5 < s["start"] <= s["end"] < prof.wall_s + 0.5 for s in prof.steps)
    assert {s["replica"] for s in prof.steps} == {0, 1}
    d = prof.to_dict(samples=False, calls=False)
    json.dumps(d, default=str)
    assert len(d["replicas"]) == 2
    prof.plot_memory()


def test_caption_with_profile_on_a_hybrid_plan_returns_the_merged_profile():
    from vlmlab.assets import SAMPLES_DIR

    p = vlmlab.plan(None, gpus="4xcpu", strategy="hybrid", batch_size=2)
    result = vlmlab.caption(SAMPLES_DIR, model=p, batch_size=2, profile=True, progress=False)
    assert result.ok and result.profile is not None
    assert result.profile.images == 8 and len(result.profile.replicas) == 2
    assert result.profile.images_per_s > 0
    assert all(r.images > 0 for r in result.profile.replicas)
