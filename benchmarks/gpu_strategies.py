"""Strategies side by side on real GPUs: single vs split vs replicate on 2 and 4 GPUs.

llava-1.5-7b shape with random weights, bf16, batch 16, 32 new tokens, the same number of
caption-shaped prompts for every strategy, all measured in the same run by ``vlmlab.bench``.
Every strategy runs in spawned worker processes (one per replica; single and split too, with
``isolate=True``), so no process's memory shows up in another's measured peak.

    python benchmarks/gpu_strategies.py --images 512 --json out.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llava-1.5-7b")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--json", default=None)
    ap.add_argument("--runs", default="single,split:2,replicate:2,replicate:4,hybrid:4",
                    help="strategy:GPUs, comma-separated, in order (a strategy may appear twice: "
                         "single first and last shows drift of the host); '@N' limits the run to the first N host cores "
                         "(single:1@16: one GPU with the share of cores a worker of replicate:4 gets on 64); "
                         "runs needing more GPUs are skipped")
    args = ap.parse_args(argv)

    import torch
    import transformers

    import vlmlab
    from vlmlab.run.affinity import usable_cpus
    from vlmlab.measure.bench import bench

    hw = vlmlab.gpus()
    n = len(hw)
    env = {"date": datetime.date.today().isoformat(), "gpu": hw[0].name if n else "cpu", "gpu_count": n,
           "torch": torch.__version__, "transformers": transformers.__version__, "host_cpus": len(usable_cpus())}
    print(f"# {env}")
    print(f"# {args.model}, random weights, bf16, batch {args.batch_size}, {args.new_tokens} new tokens, "
          f"{args.images} prompts per strategy")
    runs = []
    for token in args.runs.split(","):
        token, _, cpus = token.partition("@")
        strategy, _, count = token.partition(":")
        count = int(count) if count else {"single": 1, "hybrid": 4}.get(strategy, 2)
        if count <= n:
            runs.append((strategy, hw.select(indices=list(range(count))), int(cpus) if cpus else None))
    all_cpus = usable_cpus()
    rows = []
    for strategy, gpus, cpus in runs:
        os.sched_setaffinity(0, all_cpus[:cpus] if cpus else all_cpus)  # the spawned workers inherit it
        try:
            r = bench(args.model, strategies=[strategy], batch_sizes=[args.batch_size], gpus=gpus, n_images=args.images,
                      max_new_tokens=args.new_tokens, dtype="bfloat16", random_weights=True, progress=False,
                      isolate=True)
        except Exception as err:  # noqa: BLE001 - report it and measure the other strategies
            print(f"{strategy:<9} on {len(gpus)} GPU(s): FAILED {type(err).__name__}: {err}")
            continue
        row = r.rows[0]
        row["n_gpus"] = len(gpus)
        row["host_cpus"] = cpus or len(all_cpus)
        rows.append(row)
        print(f"{strategy:<9} on {len(gpus)} GPU(s), {row['replicas']} replica(s), {row['host_cpus']} host cores: {row['images_per_s']:7.1f} images/s "
              f"(steady {row['steady_images_per_s']:5.1f}), {row['tokens_per_s']:8.0f} tokens/s, "
              f"batch p50 {row['p50_ms']:.0f} ms, p95 {row['p95_ms']:.0f} ms, errors {row['errors']}, died {row['died']}, "
              f"load {row['load_s']:.0f} s, batches per worker {row['batches_per_worker']}")
        for d, b in sorted(row.get("peaks", {}).items()):
            pred = row["predicted"].get(d, 0)
            print(f"    GPU{d}: measured peak {b / 2**30:6.2f} GiB, predicted {pred / 2**30:6.2f} GiB "
                  f"({100 * (pred - b) / b:+.1f}%)")
        if args.json:  # after every run: a run cut short by a time limit keeps what it measured
            with open(args.json, "w") as f:
                json.dump({"env": env, "args": vars(args), "rows": rows}, f, indent=1)
    if not rows:
        return
    singles = [r for r in rows if r["strategy"] == "single"] or rows[:1]
    best = max(singles, key=lambda r: r["images_per_s"])
    print(f"# speed-up over the best single-GPU run of this invocation ({best['images_per_s']:.1f} images/s; "
          f"steady: sum over workers of rows / (go to its last batch), which leaves out the idle tail):")
    for row in rows:
        print(f"#   {row['strategy']:<9} x{row['n_gpus']} ({row['host_cpus']} cores): {row['images_per_s'] / best['images_per_s']:.2f}x, "
              f"steady {row['steady_images_per_s'] / best['steady_images_per_s']:.2f}x "
              f"(batch p50 {row['p50_ms'] / best['p50_ms']:.2f}x single's)")


if __name__ == "__main__":
    main()
