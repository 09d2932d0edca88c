"""Measured peak memory of random-weight VLMs on one GPU, for re-fitting the memory model.

For catalogue models and transformers' default configs of families outside the catalogue (two of
them with the vision settings of a published checkpoint, see OUTSIDE_FIXES): build the model with
random weights in bf16 on cuda:0, take vlmlab's dry-run inputs for it (``model.dummy_inputs.
caption_inputs``, what ``bench(random_weights=True)`` generates from: the family's own processor,
built locally, turns a 1024x768 image into the prompt's image tokens and pixel inputs, plus 16
random text tokens), at batch 1 / 16 / 64, and ``generate`` 32 new tokens. Per run it records

  measured = torch max_memory_reserved + non-torch memory (driver used - reserved after loading),

plus max_memory_allocated, the prompt length, the memory model's prediction and the config (so the
prediction can be made again offline from exactly this config: gpu_memory_any_fit.py). Each model
runs in its own process (a device-side assert poisons the CUDA context of the process for good; a
model that hits one runs once more at batch 1 with CUDA_LAUNCH_BLOCKING=1 to name the kernel), and
one JSON line per run goes to --out as soon as it is done.

    PYTHONPATH=. python benchmarks/gpu_memory_any.py --out $OUT/gpu_memory_any.jsonl
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CATALOGUE = ("llava-1.5-7b", "qwen2-vl-2b", "paligemma-3b", "internvl3-2b", "smolvlm-2.2b")
OUTSIDE = ("gemma3", "idefics2", "qwen3_vl", "mllama", "llava_onevision")
# the default order: small models first, so a run cut short by its time limit still has most families
SMALL_FIRST = ("paligemma-3b", "internvl3-2b", "qwen2-vl-2b", "smolvlm-2.2b", "gemma3", "llava-1.5-7b", "idefics2",
               "qwen3_vl", "mllama", "llava_onevision")
PROMPT_TOKENS = 16  # random text tokens after the image, as bench(random_weights=True) uses
GiB = 1024**3


# Families outside the catalogue, from transformers' default config of the type. Two defaults do not
# describe a model that runs: gemma3's vision tower (SigLIP-base at 224 px) cannot pool into its 256
# image tokens (avg_pool kernel 0: "integer out of range"), and qwen3_vl's vision output width (3584)
# is not its text width (4096: "Image features and image tokens do not match"). Those get the vision
# settings of the published checkpoints (gemma-3-4b-it, Qwen3-VL-8B).
OUTSIDE_FIXES = {
    "gemma3": {"vision_config": dict(image_size=896, patch_size=14, hidden_size=1152, intermediate_size=4304,
                                     num_hidden_layers=27, num_attention_heads=16)},
    "qwen3_vl": {"vision_config": dict(out_hidden_size=4096)},
}


def config_for(name):
    from transformers import AutoConfig

    if name in CATALOGUE:
        from vlmlab.model import catalog

        return catalog.build_config(name)
    fixes = OUTSIDE_FIXES.get(name, {})
    config = AutoConfig.for_model(name)
    for key, values in fixes.items():
        for k, v in values.items():
            setattr(getattr(config, key), k, v)
    return config


def device_used():
    """Memory in use on cuda:0 as the driver sees it (what NVML reports as used)."""
    import torch

    free, total = torch.cuda.mem_get_info(0)
    return total - free


def predicted_gib(ms, batch, prompt_tokens, new_tokens):
    """The memory model's single-GPU peak for this run (what gpu_memory_any_fit.py recomputes offline)."""
    from vlmlab.model.memory import Workload, device_memory

    d = ms.dims
    work = Workload(batch, new_tokens, max(prompt_tokens - max(d.image_sequence, d.image_tokens), 1))
    return sum(device_memory(ms.units, d, work, "bfloat16", keeps_vision_states=ms.family.keeps_vision_states).values()) / GiB


def run(name, batches, new_tokens, image_size, out):
    import torch
    import transformers

    import vlmlab
    from vlmlab.model import image_tokens
    from vlmlab.model.dummy_inputs import caption_inputs

    config = config_for(name)
    tokens = image_tokens.count(config, image_size)
    text = config.get_text_config()
    if max(tokens.prompt_ids) >= text.vocab_size:  # transformers' default idefics2 config: image id 32001, vocab 32000
        text.vocab_size = max(tokens.prompt_ids) + 1
    ms = vlmlab.spec(config).at(image_size)
    torch.cuda.empty_cache()
    t0 = time.time()
    with torch.device("cuda:0"):
        model = transformers.AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.eval()
    torch.cuda.synchronize()
    load_s = time.time() - t0
    context = device_used() - torch.cuda.memory_reserved(0)
    weights = torch.cuda.memory_allocated(0)
    for batch in batches:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(0)
        # vlmlab's random-weight dry-run inputs (what bench/profile(random_weights=True) generate from)
        inputs = caption_inputs(ms, batch, PROMPT_TOKENS, device="cuda:0", dtype=torch.bfloat16, image_size=image_size)
        prompt = int(inputs["input_ids"].shape[1])
        with torch.inference_mode():  # prefill alone (one new token): the vision + prefill peak without decode
            model.generate(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        prefill = torch.cuda.max_memory_allocated(0) / GiB, torch.cuda.max_memory_reserved(0) / GiB
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(0)
        t1 = time.time()
        with torch.inference_mode():
            result = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                    pad_token_id=0)
        torch.cuda.synchronize()
        row = {"model": name, "gpu": torch.cuda.get_device_name(0), "batch": batch, "new_tokens": new_tokens,
               "image_size": list(image_size), "image_tokens": tokens.per_image, "prompt_tokens": prompt,
               "params": sum(p.numel() for p in model.parameters()), "weights_gib": weights / GiB,
               "max_allocated_gib": torch.cuda.max_memory_allocated(0) / GiB,
               "max_reserved_gib": torch.cuda.max_memory_reserved(0) / GiB, "context_gib": context / GiB,
               "measured_gib": (torch.cuda.max_memory_reserved(0) + context) / GiB,
               "prefill_max_allocated_gib": prefill[0], "prefill_max_reserved_gib": prefill[1],
               "predicted_gib": predicted_gib(ms, batch, prompt, new_tokens),
               "output_shape": list(result.shape), "load_s": load_s, "generate_s": time.time() - t1,
               "config": config.to_dict()}
        out.write(json.dumps(row, default=str) + "\n")
        out.flush()
        print(f"{name:14s} batch {batch:3d}: reserved peak + 1.27 GiB context {row['max_reserved_gib'] + 1.27:.2f} GiB "
              f"(allocated peak {row['max_allocated_gib']:.2f}, weights {row['weights_gib']:.2f}), predicted "
              f"{row['predicted_gib']:.2f}, {row['generate_s']:.1f} s", flush=True)
        del inputs, result
    del model
    torch.cuda.empty_cache()


def child(args, name, batches, timeout, blocking=False):
    """Run one model in its own process: a device-side assert poisons the CUDA context for good."""
    import os
    import subprocess

    env = dict(os.environ, **({"CUDA_LAUNCH_BLOCKING": "1"} if blocking else {}))
    cmd = [sys.executable, __file__, "--out", args.out, "--models", name, "--batches", batches,
           "--new-tokens", str(args.new_tokens), "--one"]
    try:
        subprocess.run(cmd, check=False, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:  # its finished batches are already written
        with open(args.out, "a") as out:
            out.write(json.dumps({"model": name, "error": f"stopped after {timeout:.0f} s (time budget)"}) + "\n")


def last_error(path, name):
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    mine = [r for r in rows if r.get("model") == name]
    return mine[-1].get("error") if mine else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default=",".join(SMALL_FIRST))
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--model-timeout", type=int, default=150, help="seconds per model before it is stopped")
    ap.add_argument("--budget", type=float, default=3600, help="seconds for all models; later ones are skipped")
    ap.add_argument("--one", action="store_true", help="run the models in this process")
    args = ap.parse_args()
    import torch
    import transformers

    if not args.one:  # no CUDA call in the parent: its context would count in every child's device-wide "used"
        header = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
                  "transformers": transformers.__version__}
        print(header, flush=True)
        with open(args.out, "a") as out:
            out.write(json.dumps({"header": header}) + "\n")
        start = time.time()
        for name in args.models.split(","):
            left = args.budget - (time.time() - start)
            if left < 45:  # not enough for a model load and one generate
                print(f"skipped {name}: {left:.0f} s of the budget left", flush=True)
                with open(args.out, "a") as out:
                    out.write(json.dumps({"model": name, "error": "skipped: time budget spent"}) + "\n")
                continue
            child(args, name, args.batches, min(args.model_timeout, left))
            error = last_error(args.out, name) or ""
            left = args.budget - (time.time() - start)
            if "device-side assert" in error and left > 60:  # once more at batch 1, synchronously: name the kernel
                child(args, name, "1", min(60, left), blocking=True)
        return
    with open(args.out, "a") as out:
        for name in args.models.split(","):
            try:
                run(name, [int(b) for b in args.batches.split(",")], args.new_tokens, (1024, 768), out)
            except Exception as err:  # noqa: BLE001 - recorded, the next model still runs
                traceback.print_exc(limit=-3)
                out.write(json.dumps({"model": name, "error": f"{type(err).__name__}: {str(err)[:300]}",
                                      "where": traceback.format_exc(limit=-4)[-1500:]}) + "\n")
                out.flush()


if __name__ == "__main__":
    main()
