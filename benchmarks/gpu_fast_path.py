"""Fast captioning on one GPU (issue 12): vlmlab's own batch size and generation path against
plain transformers, in one script, on random-weight 7B models (bf16, 32 new tokens, 16 prompt
tokens plus the image tokens).

Parts, in this order (``--parts`` picks some; JSON is written after each, so a run cut short
keeps what it finished):

- ``llava``: ``vlmlab.bench("llava-1.5-7b", strategies=["single"], random_weights=True,
  max_new_tokens=32, n_images=512)`` with no batch size: the planner's batch, the fast path.
- ``plain-static`` / ``plain-eager``: plain transformers on the same model shape and inputs,
  batch 64: ``generate(..., cache_implementation="static")`` (transformers compiles the decode
  step itself) and eager ``generate``. Warm-up is timed apart from the steady part.
- ``qwen``: ``vlmlab.bench("qwen2.5-vl-7b", ...)`` the same way.
- ``b1``: batch-1 decode tokens/s of llava-1.5-7b on vlmlab's fast path (128 new tokens, the
  time of a prefill-only call subtracted) against the bandwidth roofline.

    python benchmarks/gpu_fast_path.py --json out.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import time

PARTS = ("llava", "plain-static", "plain-eager", "qwen", "b1")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--plain-batch", type=int, default=64)
    ap.add_argument("--plain-images", type=int, default=None, help="images for the plain runs (default: --images)")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--prefill", default=None, help="FastGenerator prefill: blocks, decoder or eager (default: vlmlab's)")
    ap.add_argument("--decode", default=None, help="FastGenerator decode: auto, compiled, graphs or eager (default: vlmlab's)")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode of a compiled decode step")
    ap.add_argument("--coordinate-descent", action="store_true", help="inductor's coordinate_descent_tuning (gpt-fast)")
    ap.add_argument("--inductor", default=None,
                    help="inductor config for the compiles, e.g. freezing=1,decompose_mem_bound_mm=1")
    ap.add_argument("--no-fused-norms", action="store_true", help="leave RMSNorm layers on transformers' own forward")
    ap.add_argument("--no-fast-rotary", action="store_true", help="leave the rotary embedding on transformers' own")
    ap.add_argument("--blas", default=None, help="torch.backends.cuda.preferred_blas_library (cublas, cublaslt)")
    ap.add_argument("--qwen-image-size", default="448x448",
                    help="WxH of the qwen part's images: 448x448 is the 256 image tokens of issue 12's 17.9 images/s")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    parts = args.parts.split(",")
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown part(s) {sorted(unknown)}; choose from {', '.join(PARTS)}")

    import torch
    import transformers

    import vlmlab
    from vlmlab.run import fast_generate

    from vlmlab.run import loading

    fast_generate.COMPILE_MODE = args.compile_mode or fast_generate.COMPILE_MODE
    loading.FUSED_NORMS = not args.no_fused_norms
    loading.FAST_ROTARY = not args.no_fast_rotary
    if args.coordinate_descent:
        import torch._inductor.config as inductor_config

        inductor_config.coordinate_descent_tuning = True
    for item in filter(None, (args.inductor or "").split(",")):
        import torch._inductor.config as inductor_config

        key, value = item.split("=")
        setattr(inductor_config, key, type(getattr(inductor_config, key))(int(value) if value.isdigit() else value))
    if args.blas:
        torch.backends.cuda.preferred_blas_library(args.blas)
    fast_generate.DEFAULT_PREFILL = args.prefill or fast_generate.DEFAULT_PREFILL
    fast_generate.DEFAULT_DECODE = args.decode or fast_generate.DEFAULT_DECODE
    hw = vlmlab.gpus()
    out = {"env": {"date": datetime.date.today().isoformat(), "gpu": hw[0].name if len(hw) else "cpu",
                   "torch": torch.__version__, "transformers": transformers.__version__,
                   "prefill": fast_generate.DEFAULT_PREFILL, "decode": fast_generate.DEFAULT_DECODE,
                   "compile_mode": fast_generate.COMPILE_MODE, "fused_norms": loading.FUSED_NORMS,
                   "fast_rotary": loading.FAST_ROTARY,
                   "coordinate_descent": args.coordinate_descent, "blas": args.blas,
                   "inductor": args.inductor},
           "args": vars(args), "results": {}}
    print(f"# {out['env']}", flush=True)

    def record(name, fn):
        t0 = time.perf_counter()
        try:
            out["results"][name] = fn()
        except Exception as err:  # noqa: BLE001 - a failed part is a result too; the others still run
            out["results"][name] = {"error": f"{type(err).__name__}: {str(err)[:1000]}"}
        out["results"][name]["part_wall_s"] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {json.dumps(out['results'][name], default=str)}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1, default=str)

    for part in parts:
        if part in ("llava", "qwen"):
            model = "llava-1.5-7b" if part == "llava" else "qwen2.5-vl-7b"
            size = tuple(int(v) for v in args.qwen_image_size.split("x")) if part == "qwen" else None
            record(part, lambda: _vlmlab_bench(model, args, size))
        elif part.startswith("plain-"):
            record(f"{part}-b{args.plain_batch}", lambda: _plain(part.split("-")[1], args))
        elif part == "b1":
            record(part, lambda: _batch1_decode(args))
    _summary(out["results"])
    return out


def _vlmlab_bench(model, args, image_size=None) -> dict:
    import vlmlab

    t0 = time.perf_counter()
    result = vlmlab.bench(model, strategies=["single"], random_weights=True, max_new_tokens=args.new_tokens,
                          n_images=args.images, progress=False, image_size=image_size)
    row = dict(result.rows[0])
    row["wall_s"] = time.perf_counter() - t0  # planning, loading, warm-up (compiling) and the timed images
    row["image_size"] = image_size
    row.pop("peaks", None), row.pop("predicted", None)
    return row


def _plain(kind, args) -> dict:
    """Plain transformers, no vlmlab in the timed loop: the model built on the GPU from the same
    catalogue config, the same caption-shaped inputs vlmlab's bench uses."""
    import torch
    from transformers import AutoModelForImageTextToText

    from vlmlab.model.dummy_inputs import caption_inputs
    from vlmlab.model.spec import spec

    ms, b, n, new = spec("llava-1.5-7b"), args.plain_batch, args.plain_images or args.images, args.new_tokens
    with torch.device("cuda"):
        model = AutoModelForImageTextToText.from_config(ms.config, dtype=torch.bfloat16).eval()
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
    if kind == "static":
        kw["cache_implementation"] = "static"

    def batch(i, size):
        inputs = caption_inputs(ms, size, 16, device="cuda", dtype=torch.bfloat16, seed=i)
        with torch.inference_mode():
            model.generate(**inputs, **kw)

    try:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()  # the peak of this part, not of the parts before it
        t0 = time.perf_counter()
        batch(0, b)  # warm-up: kernels, allocator pools and, for static, the compile
        torch.cuda.synchronize()
        warm = time.perf_counter() - t0
        t1 = time.perf_counter()
        for i, start in enumerate(range(0, n, b)):
            batch(i + 1, min(b, n - start))
        torch.cuda.synchronize()
        steady = time.perf_counter() - t1
        return {"generation": "static (transformers auto-compile)" if kind == "static" else "eager", "batch_size": b,
                "images": n, "warmup_s": warm, "seconds": steady, "images_per_s": n / steady,
                "wall_incl_warmup_s": warm + steady, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    finally:
        del model
        torch.cuda.empty_cache()


def _batch1_decode(args, new_tokens: int = 128) -> dict:
    import torch

    import vlmlab
    from vlmlab.model.dummy_inputs import caption_inputs
    from vlmlab.observe.roofline import decode_bytes, decode_roofline_tokens_per_s
    from vlmlab.run.fast_generate import cache_length, generation_for

    lm = vlmlab.load("llava-1.5-7b", random_weights=True, force=True)
    try:
        mode, reason, gen = generation_for(lm)
        ms = lm.plan._spec()
        inputs = caption_inputs(ms, 1, 16, device=lm.input_device, dtype=torch.bfloat16)
        prompt = inputs["input_ids"].shape[1]

        def run(n):
            kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False)
            torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.inference_mode():
                gen.generate(inputs, **kw) if gen is not None else lm.model.generate(**inputs, **kw)
            torch.cuda.synchronize()
            return time.perf_counter() - t

        first = run(new_tokens)  # compiles prefill and decode for batch 1
        full = min(run(new_tokens) for _ in range(3))
        prefill = min(run(1) for _ in range(3))
        tokens_per_s = (new_tokens - 1) / (full - prefill)
        kv = cache_length(prompt, new_tokens) if gen is not None else prompt + new_tokens // 2
        gpu = vlmlab.gpus()[0]
        roof = decode_roofline_tokens_per_s(ms, gpu, 1, kv)
        return {"generation": mode, "reason": reason,
                "decode": {str(k): v for k, v in getattr(gen, "decode_choice", {}).items()},
                "compiled_blocks": getattr(gen, "blocks", None), "fallbacks": getattr(gen, "fallbacks", None),
                "capture_s": {str(k): v for k, v in getattr(gen, "capture_s", {}).items()},
                "replays": getattr(getattr(gen, "_step", None), "replays", None),
                "first_call_s": first, "prefill_s": prefill,
                "tokens_per_s": tokens_per_s, "roofline_tokens_per_s": roof,
                "pct_of_roofline": 100 * tokens_per_s / roof if roof else None,
                "decode_gbs": tokens_per_s * decode_bytes(ms, 1, kv) / 1e9, "bytes_per_token": decode_bytes(ms, 1, kv)}
    finally:
        vlmlab.unload(lm)


def _summary(results):
    llava = results.get("llava", {})
    plain = [r for k, r in results.items() if k.startswith("plain-") and "images_per_s" in r]
    if "images_per_s" in llava:
        print(f"\nllava-1.5-7b: vlmlab {llava['images_per_s']:.1f} images/s at batch {llava.get('batch_size')} "
              f"({llava.get('generation')}); target >= 50")
        if plain:
            best = max(plain, key=lambda r: r["images_per_s"])
            print(f"  best plain transformers: {best['images_per_s']:.1f} images/s ({best['generation']}, batch "
                  f"{best['batch_size']}): vlmlab is {llava['images_per_s'] / best['images_per_s']:.2f}x; target >= 1.2x")
    qwen = results.get("qwen", {})
    if "images_per_s" in qwen:
        print(f"qwen2.5-vl-7b: {qwen['images_per_s']:.1f} images/s at batch {qwen.get('batch_size')}: "
              f"{qwen['images_per_s'] / 17.9:.2f}x the 17.9 of issue 12; target >= 2x")
    b1 = results.get("b1", {})
    if "tokens_per_s" in b1:
        print(f"batch-1 decode: {b1['tokens_per_s']:.0f} tokens/s, {b1['pct_of_roofline']:.0f}% of the "
              f"{b1['roofline_tokens_per_s']:.0f} tokens/s bandwidth roofline; target >= 70%")


if __name__ == "__main__":
    main()
