"""scripts/train_captioner.py --smoke trains a few steps and saves a folder that loads and generates."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "train_captioner.py"


@pytest.mark.slow
def test_smoke_training_saves_a_loadable_llava(tmp_path):
    out = tmp_path / "captioner"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"\nsmoke training took {seconds:.1f} s")
    assert "exact caption match" in proc.stdout and "captions identical" in proc.stdout
    for name in ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja", "generation_config.json", "README.md",
                 "eval_results.json"):
        assert (out / name).exists(), name
    assert json.loads((out / "eval_results.json").read_text())["steps"] == 8

    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

    from vlmlab.assets import scenes as synth

    processor = AutoProcessor.from_pretrained(out)
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert isinstance(model, LlavaForConditionalGeneration)
    processor.tokenizer.padding_side = "left"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "caption"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    images = [s[0] for s in synth.make_dataset(3, seed=99)]
    inputs = processor(images=images, text=[prompt] * 3, return_tensors="pt", padding=True)
    with torch.inference_mode():
        gen = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert gen.shape[0] == 3 and gen.shape[1] > inputs["input_ids"].shape[1]
    texts = processor.batch_decode(gen[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)


def test_smoke_defaults_go_to_a_temp_dir():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import train_captioner
    finally:
        sys.path.remove(str(SCRIPT.parent))
    args = train_captioner.parse_args(["--smoke"])
    assert args.steps == 8 and args.eval_n == 16
    assert "tiny-captioner-smoke" in str(args.out) and args.out != train_captioner.DEFAULT_OUT
    args.out.rmdir()  # parse_args made it (empty)
    full = train_captioner.parse_args([])
    assert full.out == train_captioner.DEFAULT_OUT and full.steps == 2500 and full.eval_n >= 200
