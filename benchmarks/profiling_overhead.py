"""What the Profiler costs: ``generate`` on a small random-weight LLaVA, with and without it.

The model is built here from a LlavaConfig (a CLIP vision tower and a Llama text model of a few
layers, random weights; float32 on the CPU unless --device/--dtype say otherwise). Variants run
interleaved, in an order rotated every round (A B C, B C A, C A B, ...) so that drift on a shared
machine falls on all of them alike, each run after a ``gc.collect()``. A timed run covers
entering the Profiler, ``generate`` and leaving it (events resolved, sampler stopped).

Reported per variant, for wall time and for the process's CPU time: the median, and the
overhead three ways: median(with) / median(without) - 1, the median over rounds of the paired
ratio, and min(with) / min(without) - 1. The variant ``off-again`` runs without profiler a second
time: its "overhead" is what noise alone shows (an A/A check). Last, an estimate that noise does
not touch: the measured cost of one hooked module call times the hooked calls of a run.

    python benchmarks/profiling_overhead.py --repeats 41 --new-tokens 32 --threads 1
"""
from __future__ import annotations

import argparse
import collections
import datetime
import gc
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def build_catalogue(name: str, device: str, dtype: str, batch: int):
    """A catalogue model at full size (random weights) through vlmlab's own loader, on one device."""
    import torch

    import vlmlab
    from vlmlab.run.loading import load
    from vlmlab.model.dummy_inputs import caption_inputs

    gpus = "1xcpu" if device == "cpu" else vlmlab.gpus().select(indices=[int(device.split(":")[1])])
    p = vlmlab.plan(name, gpus=gpus, strategy="single", dtype=dtype, batch_size=batch)
    lm = load(p, random_weights=True, force=True)
    inputs = caption_inputs(p._spec(), batch, 16, device=lm.input_device, dtype=getattr(torch, dtype))
    return lm.model, inputs, sum(t.numel() for t in lm.model.parameters())


def build(size: str, device: str, dtype: str = "float32", batch: int = 1):
    import torch

    if size not in ("small", "medium", "tiny"):
        return build_catalogue(size, device, dtype, batch)
    from transformers import AutoModelForImageTextToText, CLIPVisionConfig, LlamaConfig, LlavaConfig

    if size == "small":  # ~24M parameters: layers cost what real (if small) layers cost
        vision = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                                  image_size=224, patch_size=32, projection_dim=256)
        text = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                           num_key_value_heads=4, vocab_size=8192, max_position_embeddings=512)
    elif size == "medium":  # ~1.4B parameters, CLIP-L/14-336 and TinyLlama shapes: for GPUs
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                  image_size=336, patch_size=14, projection_dim=768)
        text = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
    else:  # "tiny": layers so cheap that Python overhead dominates: the worst case for per-layer hooks
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=32, patch_size=8, projection_dim=32)
        text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                           num_key_value_heads=1, vocab_size=128, max_position_embeddings=512)
    if batch != 1:
        raise SystemExit("--batch applies to catalogue models (--size llava-1.5-7b)")
    image_token = text.vocab_size - 1
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token, vision_feature_layer=-2,
                      image_seq_length=(vision.image_size // vision.patch_size) ** 2)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(cfg).eval().to(device=device, dtype=getattr(torch, dtype))
    n_img = (vision.image_size // vision.patch_size) ** 2
    ids = torch.tensor([[1] + [image_token] * n_img + list(range(5, 21))])
    inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
              "pixel_values": torch.randn(1, 3, vision.image_size, vision.image_size).to(device=device, dtype=getattr(torch, dtype))}
    return model, inputs, sum(p.numel() for p in model.parameters())


def hook_cost_us(rounds: int = 7, calls: int = 20_000) -> float:
    """Host time one hooked module call adds (pre + post hook, and torch's slower call path for a
    module with hooks), on a module of 4 Identity "layers": noise-free where whole runs are not."""
    import torch

    from vlmlab.observe.profiler import Profiler

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Identity() for _ in range(4))

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    m, x = Stack(), torch.zeros(1)

    def per_call():
        t = time.process_time()
        for _ in range(calls // 4):
            m(x)
        return (time.process_time() - t) / (calls // 4)

    plain = min(per_call() for _ in range(rounds))
    with Profiler(m, roles={"layers": ["layers"]}, memory=False):
        hooked = min(per_call() for _ in range(rounds))
    return (hooked - plain) / 5 * 1e6  # 5 hooked calls per forward: the model's own + 4 layers


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=21, help="timed runs of each variant")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--size", default="small",
                    help="small, tiny, medium (built here), or a catalogue model such as llava-1.5-7b (random weights)")
    ap.add_argument("--batch", type=int, default=1, help="prompts per generate (catalogue models only)")
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--interval", type=float, default=0.05, help="memory sampling period of the profiler (s)")
    ap.add_argument("--variants", default="off,off-again,layers,devices",
                    help="comma-separated: off, off-again (no profiler again: an A/A check of the noise), layers, "
                         "devices; '@N' times decoder layers on one decode step in N (layers@4), '-nomem' turns the "
                         "memory sampler off (layers-nomem)")
    args = ap.parse_args(argv)

    import torch
    import transformers

    from vlmlab.observe.profiler import Profiler

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    model, inputs, n_params = build(args.size, args.device, dtype, args.batch)
    n = args.new_tokens
    gen = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    fixed = collections.defaultdict(list)  # variant -> seconds spent entering and leaving the Profiler

    def run(variant):
        gc.collect()  # every run starts from the same heap: no run pays for an earlier one's garbage
        sync()
        t, c = time.perf_counter(), time.process_time()
        with torch.no_grad():
            if variant.startswith("off"):
                model.generate(**inputs, **gen)
                sync()
            else:
                spec, _, nomem = variant.partition("-")
                detail, _, every = spec.partition("@")
                prof = Profiler(model, interval=args.interval, detail=detail, memory=not nomem,
                                layer_every=int(every) if every else None)
                t1 = time.perf_counter()
                with prof:  # the Profiler's own entry and exit are timed apart as well
                    t2 = time.perf_counter()
                    model.generate(**inputs, **gen)
                    prof.count(1, n)
                    t3 = time.perf_counter()
                fixed[variant].append((t2 - t1) + (time.perf_counter() - t3))
        return time.perf_counter() - t, time.process_time() - c, (None if variant.startswith("off") else prof.result())

    variants = args.variants.split(",")
    if variants[0] != "off" or all(v.startswith("off") for v in variants):
        ap.error("--variants starts with off and names at least one profiled variant")
    for v in variants * 2:  # warm-up (allocator, lazily installed transformers hooks, caches)
        run(v)
    for v in variants:
        fixed[v].clear()
    times = {v: [] for v in variants}
    cpu = {v: [] for v in variants}
    last = {}
    for r in range(args.repeats):  # rotate the order: each variant follows each other one equally often
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            dt, dc, prof = run(v)
            times[v].append(dt)
            cpu[v].append(dc)
            if prof is not None:
                last[v] = prof

    print(f"# vlmlab Profiler overhead, {datetime.date.today().isoformat()}")
    print(f"# command: python benchmarks/{os.path.basename(__file__)} {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"# machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, Python {platform.python_version()}, "
          f"device {args.device}; load average at end {os.getloadavg()[0]:.1f} (the machine is shared)")
    print(f"# model: random-weight LLaVA '{args.size}' ({n_params / 1e6:.1f} M parameters: CLIP vision tower + Llama, "
          f"{model.config.text_config.num_hidden_layers} decoder layers, {dtype}), batch {inputs['input_ids'].shape[0]}, "
          f"{inputs['input_ids'].shape[1]} prompt tokens, {n} new tokens; {args.repeats} interleaved repeats")
    print(f"# profiler: memory sampled every {args.interval * 1000:.0f} ms; detail='layers' hooks every decoder layer, "
          f"detail='devices' only each device's first and last layer")
    for label, table in (("wall time", times), ("CPU time of the process (all threads)", cpu)):
        base = statistics.median(table["off"])
        print(f"## {label}")
        print(f"{'variant':<50}{'median s':>10}{'min s':>10}{'max s':>10}{'median':>10}{'paired':>10}{'min':>10}")
        for v in variants:
            med = statistics.median(table[v])
            ratios = [a / b for a, b in zip(table[v], table["off"])]
            over = "" if v == "off" else f"{100 * (med / base - 1):+.2f}%"
            paired = "" if v == "off" else f"{100 * (statistics.median(ratios) - 1):+.2f}%"
            best = "" if v == "off" else f"{100 * (min(table[v]) / min(table['off']) - 1):+.2f}%"
            if v.startswith("off"):
                name = "no profiler" if v == "off" else "no profiler again (A/A: the noise)"
            else:
                name = "Profiler detail=" + v.replace("-nomem", ", no sampler").replace("@", ", layer_every=")
            print(f"{name:<50}{med:>10.4f}{min(table[v]):>10.4f}{max(table[v]):>10.4f}{over:>10}{paired:>10}{best:>10}")
    print("# entering + leaving the Profiler (median, ms): "
          + ", ".join(f"{v} {statistics.median(fixed[v]) * 1e3:.2f}" for v in variants if not v.startswith("off")))
    first = next(v for v in variants if not v.startswith("off"))
    p = last[first]
    lat = p.latency
    print(f"# one profiled run ({first}): {p}")
    print(f"#   vision encode {lat['vision encode']['mean_ms']:.2f} ms, prefill {lat['prefill']['mean_ms']:.2f} ms, "
          f"decode p50 {lat['decode']['p50_ms']:.2f} ms/token over {lat['decode']['calls']} steps; "
          f"{len(p.samples)} memory samples")
    print("# overhead columns: median = median(with) / median(without) - 1; paired = median over rounds of "
          "with/without - 1; min = min(with) / min(without) - 1 (the least disturbed runs; load from other "
          "processes only adds time, the profiler's work is in every run)")
    if args.device == "cpu":
        us = hook_cost_us()
        steps = lat["prefill"]["calls"] + lat["decode"]["calls"]
        other = lat["vision encode"]["calls"] + lat.get("projector", {"calls": 0})["calls"]
        n_layers = model.config.text_config.num_hidden_layers
        # modules with hooks called per run: the model and the head each step, plus every decoder layer
        # (detail='layers') or the first and last one (detail='devices'); vision tower and projector once
        calls = {"layers": steps * (n_layers + 2) + other, "devices": steps * (2 + 2) + other}
        base_cpu = statistics.median(cpu["off"])
        print(f"## estimate from the cost of one hooked call: {us:.2f} us of CPU (min of 7 rounds, Identity layers)")
        for v, n_calls in calls.items():
            print(f"Profiler detail={v:<8} {n_calls:>5} hooked module calls per run -> {n_calls * us / 1e3:.2f} ms "
                  f"= {100 * n_calls * us / 1e6 / base_cpu:.2f}% of the median CPU time without profiler")


if __name__ == "__main__":
    main()
