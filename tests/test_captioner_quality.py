"""The shipped tiny captioner (vlmlab/models/tiny-captioner) loads through the Auto classes and
captions held-out synthetic scenes correctly.

These tests fail (not skip) when the model folder is missing: the trained model is part of vlmlab.
"""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vlmlab.assets import BUNDLED_MODEL_DIR as MODEL_DIR, SAMPLES_DIR  # noqa: E402
from vlmlab.assets import scenes as synth  # noqa: E402

HELDOUT_SEED = 4242  # not the training seed (1234, in eval_results.json) nor the model card's eval seed
N_HELDOUT = 240
PROMPT = "<s>USER: <image> caption ASSISTANT:"
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "caption"}]}]


@pytest.fixture(scope="module")
def captioner():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    assert (MODEL_DIR / "config.json").exists(), f"{MODEL_DIR} is missing: run scripts/train_captioner.py"
    torch.manual_seed(0)
    processor = AutoProcessor.from_pretrained(MODEL_DIR)
    model = AutoModelForImageTextToText.from_pretrained(MODEL_DIR).eval()
    return processor, model


def caption(processor, model, images, batch_size=80):
    processor.tokenizer.padding_side = "left"  # decoder-only batching
    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    out = []
    for i in range(0, len(images), batch_size):
        chunk = list(images[i:i + batch_size])
        inputs = processor(images=chunk, text=[prompt] * len(chunk), return_tensors="pt", padding=True)
        with torch.inference_mode():
            gen = model.generate(**inputs, max_new_tokens=10, do_sample=False)
        out += processor.batch_decode(gen[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [c.strip() for c in out]


def test_files_are_plain_and_small():
    weights = list(MODEL_DIR.glob("*.safetensors"))
    assert weights and sum(f.stat().st_size for f in weights) <= 25 * 1024**2
    assert not list(MODEL_DIR.glob("*.bin")) and not list(MODEL_DIR.glob("*.pt"))
    config = json.loads((MODEL_DIR / "config.json").read_text())
    assert config["model_type"] == "llava" and config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["vision_config"]["model_type"] == "clip_vision_model"
    assert config["text_config"]["model_type"] == "llama"
    for name in ("config.json", "processor_config.json", "tokenizer_config.json", "generation_config.json"):
        text = (MODEL_DIR / name).read_text()
        assert "auto_map" not in text and "trust_remote_code" not in text, name
    proc = json.loads((MODEL_DIR / "processor_config.json").read_text())
    assert proc["processor_class"] == "LlavaProcessor"
    assert proc["image_processor"]["image_processor_type"] == "CLIPImageProcessor"
    card = (MODEL_DIR / "README.md").read_text()
    assert "vlmlab tiny-captioner" in card[:2000] and "transformers>=5.17" in card and "2026-11-21" in card


def test_heldout_seed_was_not_used_for_training():
    results = json.loads((MODEL_DIR / "eval_results.json").read_text())
    assert HELDOUT_SEED not in (results["train_seed"], results["eval_seed"])


def test_prompt_and_image_tokens(captioner):
    processor, model = captioner
    assert processor.apply_chat_template(MESSAGES, add_generation_prompt=True) == PROMPT
    image = synth.make_scene(np.random.default_rng(0))[0]
    inputs = processor(images=[image], text=[PROMPT], return_tensors="pt")
    image_token_id = model.config.image_token_id
    assert int((inputs["input_ids"] == image_token_id).sum()) == model.config.image_seq_length == 64
    assert processor.tokenizer.unk_token_id not in inputs["input_ids"][0].tolist()
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 64, 64)


def test_heldout_exact_match(captioner):
    processor, model = captioner
    scenes = synth.make_dataset(N_HELDOUT, seed=HELDOUT_SEED)
    t0 = time.perf_counter()
    preds = caption(processor, model, [s[0] for s in scenes])
    seconds = time.perf_counter() - t0
    exact = np.mean([p == ref for p, (_, ref, _) in zip(preds, scenes)])
    per_object = []
    fields = {"count": [], "colour": [], "kind": [], "position": []}
    for pred, (_, ref, objects) in zip(preds, scenes):
        p, r = synth.parse_caption(pred) or {}, synth.parse_caption(ref)
        per_object += [(p.get("kind"), p.get("colour")) == (o["kind"], o["colour"]) for o in objects]
        for k in fields:
            fields[k].append(p.get(k) == r[k])
    print(f"\n{N_HELDOUT} held-out scenes (seed {HELDOUT_SEED}) captioned in {seconds:.1f} s: "
          f"exact match {exact:.1%}, per-object kind+colour {np.mean(per_object):.1%}, "
          + ", ".join(f"{k} {np.mean(v):.1%}" for k, v in fields.items()))
    wrong = [(ref, p) for p, (_, ref, _) in zip(preds, scenes) if p != ref]
    for ref, p in wrong[:10]:
        print(f"  ref {ref!r:38} got {p!r}")
    assert exact >= 0.90, f"exact match {exact:.1%} < 90%"
    assert np.mean(per_object) >= 0.90


def test_batched_equals_one_by_one(captioner):
    processor, model = captioner
    images = [s[0] for s in synth.make_dataset(6, seed=HELDOUT_SEED + 1)]
    assert caption(processor, model, images, batch_size=6) == [caption(processor, model, [im])[0] for im in images]


def test_shipped_samples(captioner):
    processor, model = captioner
    refs = json.loads((SAMPLES_DIR / "captions.json").read_text())
    from PIL import Image

    names = sorted(refs)
    preds = caption(processor, model, [Image.open(SAMPLES_DIR / n).convert("RGB") for n in names])
    right = sum(p == refs[n] for p, n in zip(preds, names))
    print(f"\nshipped samples: {right}/{len(names)} captions exact: {preds}")
    assert right >= len(names) - 1
