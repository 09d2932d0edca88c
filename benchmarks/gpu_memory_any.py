"""Measured peak memory of random-weight VLMs on one GPU, for re-fitting the memory model.

For catalogue models and transformers' default configs of families outside the catalogue: build
the model with random weights in bf16 on cuda:0, make one caption-shaped prompt with the family's
own processor (vlmlab.model.image_tokens builds it locally: image size 1024x768, the photo-sized
default), repeat it to batch 1 / 16 / 64 and ``generate`` 32 new tokens. Per run it records

  measured = torch max_memory_reserved + non-torch memory (driver used - reserved after loading),

plus max_memory_allocated, the prompt length and the config (so the prediction can be made
offline from exactly this config). One JSON line per run goes to --out as soon as it is done.

    python benchmarks/gpu_memory_any.py --out $OUT/gpu_memory_any.jsonl
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CATALOGUE = ("llava-1.5-7b", "qwen2-vl-2b", "paligemma-3b", "internvl3-2b", "smolvlm-2.2b")
OUTSIDE = ("gemma3", "idefics2", "qwen3_vl", "mllama")
GiB = 1024**3


def _module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def config_for(name):
    from transformers import AutoConfig

    if name in CATALOGUE:
        catalog = _module("vlmlab_catalog", ROOT / "vlmlab" / "model" / "catalog.py")
        return catalog.build_config(name)
    return AutoConfig.for_model(name)


def batch_inputs(tokens, batch, device):
    import torch

    ids = torch.tensor([tokens.prompt_ids] * batch)
    out = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    for key, value in tokens.inputs.items():
        if not hasattr(value, "to"):
            continue
        value = torch.cat([value] * batch, dim=0)
        out[key] = value.to(device=device, dtype=torch.bfloat16 if value.is_floating_point() else value.dtype)
    return out


def device_used():
    """Memory in use on cuda:0 as the driver sees it (what NVML reports as used)."""
    import torch

    free, total = torch.cuda.mem_get_info(0)
    return total - free


def run(name, batches, new_tokens, image_size, out):
    import torch
    import transformers

    image_tokens = _module("vlmlab_image_tokens", ROOT / "vlmlab" / "model" / "image_tokens.py")
    config = config_for(name)
    tokens = image_tokens.count(config, image_size)
    text = config.get_text_config()
    if max(tokens.prompt_ids) >= text.vocab_size:  # transformers' default idefics2 config: image id 32001, vocab 32000
        text.vocab_size = max(tokens.prompt_ids) + 1
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
        inputs = batch_inputs(tokens, batch, "cuda:0")
        t1 = time.time()
        with torch.inference_mode():
            result = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                    pad_token_id=0)
        torch.cuda.synchronize()
        row = {"model": name, "gpu": torch.cuda.get_device_name(0), "batch": batch, "new_tokens": new_tokens, "image_size": list(image_size),
               "image_tokens": tokens.per_image, "prompt_tokens": len(tokens.prompt_ids),
               "params": sum(p.numel() for p in model.parameters()), "weights_gib": weights / GiB,
               "max_allocated_gib": torch.cuda.max_memory_allocated(0) / GiB,
               "max_reserved_gib": torch.cuda.max_memory_reserved(0) / GiB, "context_gib": context / GiB,
               "measured_gib": (torch.cuda.max_memory_reserved(0) + context) / GiB,
               "output_shape": list(result.shape), "load_s": load_s, "generate_s": time.time() - t1,
               "config": config.to_dict()}
        out.write(json.dumps(row, default=str) + "\n")
        out.flush()
        print(f"{name:14s} batch {batch:3d}: measured {row['measured_gib']:.2f} GiB (allocated peak "
              f"{row['max_allocated_gib']:.2f}, weights {row['weights_gib']:.2f}), {row['generate_s']:.1f} s", flush=True)
        del inputs, result
    del model
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="gemma3,llava-1.5-7b,qwen2-vl-2b,idefics2,paligemma-3b,qwen3_vl,"
                                        "internvl3-2b,smolvlm-2.2b,mllama")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--one", action="store_true", help="run the models in this process")
    args = ap.parse_args()
    import torch
    import transformers

    # no CUDA call in the parent: its context would count in every child's device-wide "used"
    header = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "transformers": transformers.__version__}
    with open(args.out, "a") as out:
        if not args.one:
            print(header, flush=True)
            out.write(json.dumps({"header": header}) + "\n")
            out.flush()
        for name in args.models.split(","):
            if not args.one:  # each model in its own process: a device-side assert kills the CUDA context
                import subprocess

                subprocess.run([sys.executable, __file__, "--out", args.out, "--models", name, "--batches", args.batches,
                                "--new-tokens", str(args.new_tokens), "--one"], check=False)
                continue
            try:
                run(name, [int(b) for b in args.batches.split(",")], args.new_tokens, (1024, 768), out)
            except Exception as err:  # noqa: BLE001 - recorded, the next model still runs
                traceback.print_exc(limit=-3)
                out.write(json.dumps({"model": name, "error": f"{type(err).__name__}: {str(err)[:300]}",
                                      "where": traceback.format_exc(limit=-4)[-1500:]}) + "\n")
                out.flush()


if __name__ == "__main__":
    main()
