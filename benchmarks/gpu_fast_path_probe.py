"""The probe run before vlmlab's fast path was written (issue 12): what plain transformers does on the
GPU machine's versions (torch 2.11, transformers 5.17), llava-1.5-7b and qwen2.5-vl-7b with random
weights at batch 64: eager generate, generate(cache_implementation="static") (transformers compiles
the decode step), and static + the language model's forward compiled for the prefill; batch-1 decode.
Results: benchmarks/results/gpu_fast_path_probe.json (read with gpu_fast_path.txt, which says what they
taught). Reads the catalogue by file path so that it runs without vlmlab installed.

    python benchmarks/gpu_fast_path_probe.py    # writes $OUT/explore.json
"""
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback

import torch
import transformers

OUT = os.environ.get("OUT", "/tmp")
R = {"torch": torch.__version__, "transformers": transformers.__version__, "gpu": torch.cuda.get_device_name(0)}
try:
    R["pip"] = [l for l in subprocess.run([sys.executable, "-m", "pip", "list"], capture_output=True, text=True).stdout.splitlines()
                if l.split(" ")[0].lower() in ("pandas", "tqdm", "nvidia-ml-py", "accelerate", "safetensors", "pillow", "numpy",
                                              "matplotlib", "ipywidgets", "ipython", "psutil", "datasets", "huggingface-hub", "jinja2", "ray")]
except Exception as e:
    R["pip"] = str(e)


def save():
    with open(f"{OUT}/explore.json", "w") as f:
        json.dump(R, f, indent=1, default=str)
    print(json.dumps({k: v for k, v in R.items() if k != "pip"}, default=str)[-1500:], flush=True)


spec = importlib.util.spec_from_file_location("cat", "vlmlab/model/catalog.py")
cat = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cat)


def build(name):
    cfg = cat.build_config(name)
    with torch.device("cuda"):
        m = transformers.AutoModelForImageTextToText.from_config(cfg, dtype=torch.bfloat16)
    return m.eval()


def llava_inputs(cfg, b, prompt=16):
    g = torch.Generator().manual_seed(0)
    img = cfg.image_token_id if getattr(cfg, "image_token_id", None) is not None else cfg.image_token_index
    text = torch.randint(10, 31000, (b, prompt), generator=g)
    text[text == img] = 11
    ids = torch.cat([text[:, :1], torch.full((b, 576), img), text[:, 1:]], 1)
    return {"input_ids": ids.cuda(), "attention_mask": torch.ones_like(ids).cuda(),
            "pixel_values": torch.randn(b, 3, 336, 336, generator=g).to("cuda", torch.bfloat16)}


def qwen_inputs(cfg, b, prompt=16):
    g = torch.Generator().manual_seed(0)
    img, vs = cfg.image_token_id, cfg.vision_start_token_id
    text = torch.randint(10, 150000, (b, prompt), generator=g)
    text[(text == img) | (text == vs)] = 10
    side = 32
    ids = torch.cat([text[:, :1], torch.full((b, 1), vs), torch.full((b, 256), img), text[:, 1:]], 1)
    return {"input_ids": ids.cuda(), "attention_mask": torch.ones_like(ids).cuda(),
            "pixel_values": torch.randn(b * side * side, 3 * 2 * 14 * 14, generator=g).to("cuda", torch.bfloat16),
            "image_grid_thw": torch.tensor([[1, side, side]] * b).cuda()}


def timed(m, inp, n, **kw):
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.inference_mode():
        out = m.generate(**inp, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)
    torch.cuda.synchronize()
    return round(time.perf_counter() - t, 4), out.shape[1] - inp["input_ids"].shape[1]


def step(key, fn):
    t = time.perf_counter()
    try:
        R[key] = fn()
    except Exception as e:
        R[key] = {"error": f"{type(e).__name__}: {str(e)[:800]}", "tb": traceback.format_exc()[-2500:]}
    R[key + "_wall"] = round(time.perf_counter() - t, 1)
    save()


def compile_prefill(m):
    dec = m.get_decoder()
    dec.forward = torch.compile(dec.forward, dynamic=False)
    return type(dec).__name__


def run_model(name, make_inputs, b, tag, eager_reps=2, static_reps=3):
    t = time.perf_counter()
    m = build(name)
    R[f"{tag}_build_s"] = round(time.perf_counter() - t, 1)
    inp = make_inputs(m.config, b)
    R[f"{tag}_prompt_len"] = inp["input_ids"].shape[1]

    def eager():
        timed(m, inp, 2)
        return {"gen32": [timed(m, inp, 32)[0] for _ in range(eager_reps)], "prefill_only": [timed(m, inp, 1)[0] for _ in range(2)]}

    step(f"{tag}_eager_b{b}", eager)

    def static():
        first = timed(m, inp, 32, cache_implementation="static")
        return {"first": first, "gen32": [timed(m, inp, 32, cache_implementation="static")[0] for _ in range(static_reps)],
                "prefill_only": [timed(m, inp, 1, cache_implementation="static")[0] for _ in range(2)]}

    step(f"{tag}_static_b{b}", static)
    step(f"{tag}_compile_prefill_class", lambda: compile_prefill(m))

    def static_cp():
        first = timed(m, inp, 32, cache_implementation="static")
        return {"first": first, "gen32": [timed(m, inp, 32, cache_implementation="static")[0] for _ in range(static_reps)],
                "prefill_only": [timed(m, inp, 1, cache_implementation="static")[0] for _ in range(2)],
                "mem_max_gib": torch.cuda.max_memory_allocated() / 2**30}

    step(f"{tag}_static_cprefill_b{b}", static_cp)
    return m


m = run_model("llava-1.5-7b", llava_inputs, 64, "llava")


def b1():
    inp = llava_inputs(m.config, 1)
    first = timed(m, inp, 128, cache_implementation="static")
    runs = [timed(m, inp, 128, cache_implementation="static")[0] for _ in range(2)]
    pre = [timed(m, inp, 1, cache_implementation="static")[0] for _ in range(2)]
    return {"first": first, "gen128": runs, "prefill": pre, "tok_s": 127 / (min(runs) - min(pre))}


step("llava_b1_decode", b1)
del m
torch.cuda.empty_cache()
m = run_model("qwen2.5-vl-7b", qwen_inputs, 64, "qwen", eager_reps=1, static_reps=2)
print("DONE", flush=True)
