"""Where a fast-path batch spends its GPU time: the kernels of one prefill and of one decode step,
summed by kind (matmuls, attention, norms, copies, other element-wise), from torch's profiler.

A random-weight model is loaded the way ``vlmlab.load`` loads it (fused norms included) and runs
through ``FastGenerator`` with eager decode steps, so every kernel of a step is visible (a replayed
CUDA graph runs the same kernels without their launches). The prefill is a one-token ``generate``;
a decode step is the difference between a ``1 + steps``-token and a one-token call, over ``steps``.

    PYTHONPATH=. python benchmarks/gpu_profile.py --model llava-1.5-7b --batch 171 --json out.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import re

KINDS = (  # first match wins: attention kernels' names also hold "sm90", matmuls' "kernel"
    ("attention", r"flash|fmha|attention|attn"),
    ("matmul", r"gemm|gemv|cutlass|nvjet|xmma|cublas|sm\d\d_|splitk|matmul"),
    ("norm", r"norm"),
    ("copy", r"copy|cat|index|scatter|gather|fill|where"),
    ("elementwise", r"elementwise|vectorized|unrolled|reduce|silu|gelu|mul|add"),
)


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other"


def kernel_times(fn) -> dict[str, float]:
    """Seconds of GPU time per kernel name while ``fn()`` runs."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    gpu = torch.cuda.is_available()  # on a CPU (a smoke test) the operators' own time stands in
    _sync()
    with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
        fn()
        _sync()
    kind = torch.autograd.DeviceType.CUDA if gpu else torch.autograd.DeviceType.CPU
    out: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == kind and (gpu or not event.cpu_children):
            out[event.name] = out.get(event.name, 0.0) + (event.device_time if gpu else event.self_cpu_time_total) / 1e6
    return out


def _vision_peak(model, inputs) -> float | None:
    """GiB the image features of ``inputs`` take at their peak beyond what was allocated before
    (the vision tower and projector alone), or None where the model has no ``get_image_features``."""
    import inspect

    import torch

    features = getattr(model, "get_image_features", None)
    if features is None:
        return None
    takes = inspect.signature(features).parameters
    kwargs = {k: v for k, v in inputs.items() if k in takes}
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        out = features(**kwargs)
    torch.cuda.synchronize()
    del out
    return (torch.cuda.max_memory_allocated() - before) / 2**30


def _context_gib() -> float:
    import torch

    free, total = torch.cuda.mem_get_info()
    return ((total - free) - torch.cuda.memory_reserved()) / 2**30


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def by_kind(times: dict[str, float]) -> dict[str, float]:
    out = {kind: 0.0 for kind, _ in KINDS} | {"other": 0.0}
    for name, s in times.items():
        out[kind_of(name)] += s
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llava-1.5-7b", help="a catalogue name, or 'bundled' (the CPU smoke test)")
    ap.add_argument("--batch", default="171", help="batch sizes, comma-separated")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--image-size", default=None, help="WxH of the images (default: the planner's)")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--gemv", action="store_true",
                    help="also time batch-1 products with each distinct weight shape of the language model, alone "
                         "and with the projections that share an input fused (q+k+v, gate+up)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch
    import transformers

    import vlmlab

    size = tuple(int(v) for v in args.image_size.split("x")) if args.image_size else None
    bundled = args.model == "bundled"
    lm = vlmlab.load(None if bundled else args.model, random_weights=not bundled, force=True)
    out = {"env": {"date": datetime.date.today().isoformat(),
                   "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                   "torch": torch.__version__, "transformers": transformers.__version__},
           "model": args.model, "fused_norms": lm.model.__dict__.get("_vlmlab_fused_norms", []),
           "fast_rotary": lm.model.__dict__.get("_vlmlab_fast_rotary", []), "batches": {}}
    try:
        if args.gemv and torch.cuda.is_available():
            out["gemv"] = gemv_table(lm.model)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(out, f, indent=1)
        for batch in (int(b) for b in args.batch.split(",")):
            out["batches"][batch] = one_batch(lm, batch, args, size)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(out, f, indent=1)
    finally:
        vlmlab.unload(lm)
    return out


def gemv_table(model, repeats: int = 50) -> list[dict]:
    """GB/s of ``F.linear`` at one row for each weight shape of the language model's decoder layers
    and the head, and for the fused shapes, each product replayed from a CUDA graph (no launches
    in the time), with cuBLAS and with cuBLASLt."""
    import torch
    from torch.nn.functional import linear

    layer = model.get_decoder().layers[0]
    shapes = {}
    for name, module in layer.named_modules():
        if isinstance(module, torch.nn.Linear):
            shapes.setdefault(tuple(module.weight.shape), []).append(name.split(".")[-1])
    head = model.get_output_embeddings()
    shapes[tuple(head.weight.shape)] = ["head"]
    attn = [shapes_of(layer, n) for n in ("q_proj", "k_proj", "v_proj")]
    mlp = [shapes_of(layer, n) for n in ("gate_proj", "up_proj")]
    for parts, label in ((attn, "q+k+v"), (mlp, "gate+up")):
        if all(parts):
            shapes[(sum(p[0] for p in parts), parts[0][1])] = [label]
    rows = []
    dtype, device = model.dtype, model.device
    for lib in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(lib)
        for (n, k), names in shapes.items():
            w = torch.randn(n, k, dtype=dtype, device=device)
            x = torch.randn(1, k, dtype=dtype, device=device)
            linear(x, w)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(repeats):
                    linear(x, w)
            graph.replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            us = 1e3 * start.elapsed_time(end) / repeats
            rows.append({"blas": lib, "shape": [n, k], "names": names, "us": us,
                         "gbs": w.numel() * w.element_size() / us / 1e3})
            print(f"gemv {lib:9s} {n:6d} x {k:5d} {'+'.join(names):24s} {us:7.1f} us  {rows[-1]['gbs']:6.0f} GB/s")
            del graph, w, x
    torch.backends.cuda.preferred_blas_library("cublas")
    return rows


def shapes_of(layer, name):
    for full, module in layer.named_modules():
        if full.split(".")[-1] == name and hasattr(module, "weight"):
            return tuple(module.weight.shape)
    return None


def one_batch(lm, batch: int, args, size) -> dict:
    """Kernels by kind of a prefill and a decode step (eager steps), the step's time when replayed as a
    CUDA graph, and the peak memory of the eager calls next to the memory model's prediction."""
    import time

    import torch

    import vlmlab
    from vlmlab.model.dummy_inputs import caption_inputs
    from vlmlab.run.fast_generate import FastGenerator

    inputs = caption_inputs(lm.plan._spec(), batch, 16, device=lm.input_device, dtype=lm.model.dtype, image_size=size)
    new = 1 + args.steps
    gpu = torch.cuda.is_available()

    def timed_calls(fast):
        def call(n):
            with torch.inference_mode():
                fast.generate(inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

        call(new)  # warm-up: the cache, cuBLAS handles, allocator pools, the capture
        seconds = {}
        for n in (1, new, 1, new):
            _sync()
            t0 = time.perf_counter()
            call(n)
            _sync()
            seconds[n] = min(seconds.get(n, float("inf")), time.perf_counter() - t0)
        return call, seconds[1], (seconds[new] - seconds[1]) / args.steps

    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    eager = FastGenerator(lm.model, decode="eager")
    call, prefill_s, eager_step_s = timed_calls(eager)
    row = {"prompt_tokens": int(inputs["input_ids"].shape[1]), "prefill_wall_s": prefill_s,
           "eager_step_ms": 1e3 * eager_step_s}
    if gpu:
        row.update(peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
                   peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30)
    prefill = kernel_times(lambda: call(1))
    both = kernel_times(lambda: call(new))
    step = {k: (both.get(k, 0.0) - prefill.get(k, 0.0)) / args.steps for k in both}
    eager.close()
    if gpu:
        row["vision_peak_gib"] = _vision_peak(lm.model, inputs)
        graphs = FastGenerator(lm.model, decode="graphs")
        row["graphs_step_ms"] = 1e3 * timed_calls(graphs)[2]
        graphs.close()
        card = f"1x{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f}GiB"  # the model holds the real one
        plan = vlmlab.plan(args.model, gpus=card, strategy="single", batch_size=batch, max_new_tokens=32,
                           image_size=size)
        row["predicted_gib"] = max(plan.predicted().values()) / 2**30
        row["measured_gib"] = row["peak_reserved_gib"] + _context_gib()  # as bench measures it
    print(f"\n# batch {batch}: {json.dumps(row)}")
    for label, times in (("prefill", prefill), ("decode_step", step)):
        kinds = by_kind(times)
        total = sum(kinds.values())
        row[label] = {"kernel_s": total, "by_kind_s": kinds,
                      "top": sorted(((n[:120], s) for n, s in times.items()), key=lambda t: -t[1])[:args.top]}
        print(f"{label}: {1e3 * total:.2f} ms of kernels")
        for kind, s in sorted(kinds.items(), key=lambda t: -t[1]):
            print(f"  {kind:12s} {1e3 * s:9.2f} ms  {100 * s / total if total else 0:5.1f} %")
        for name, s in row[label]["top"]:
            print(f"    {1e3 * s:9.3f} ms  {name}")
    return row


if __name__ == "__main__":
    main()
