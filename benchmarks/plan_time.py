"""How long planning takes, from config to Plan, on this machine (no GPU needed).

For each model, in a fresh process: the one-off import of torch/transformers and of the model
family's modeling code (paid once per kernel, whatever is planned), then
``vlmlab.plan(model, gpus=..., strategy=...)`` timed cold (catalogue config -> meta-device module
tree -> units -> placement -> memory) and warm (spec cached, placement only), median of repeats.
Targets: llava-1.5-7b < 1 s, qwen2.5-vl-72b < 5 s (cold, after imports).

    python benchmarks/plan_time.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

CASES = [("llava-1.5-7b", "2x24GiB", "split", 1.0), ("qwen2.5-vl-72b", "4xh100-80gb", "split", 5.0)]

CHILD = """
import json, sys, time
model, gpus, strategy = sys.argv[1:4]
t0 = time.perf_counter()
import torch, transformers, accelerate  # noqa: F401
import vlmlab
from vlmlab.model import catalog
for arch in catalog.entry(model)["config"].get("architectures", []):  # the family's modeling code
    getattr(transformers, arch)
t_import = time.perf_counter() - t0
t0 = time.perf_counter(); vlmlab.plan(model, gpus=gpus, strategy=strategy, batch_size=16); cold = time.perf_counter() - t0
warm = []
for _ in range(3):
    t0 = time.perf_counter(); vlmlab.plan(model, gpus=gpus, strategy=strategy, batch_size=16); warm.append(time.perf_counter() - t0)
print(json.dumps({"import_s": t_import, "cold_s": cold, "warm_s": min(warm)}))
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"python {platform.python_version()}")
    print(f"{'model':<16} {'gpus':<12} {'strategy':<8} {'import s':>9} {'cold s':>8} {'warm s':>8} {'target':>7}  ok")
    failed = False
    for model, gpus, strategy, target in CASES:
        runs = [json.loads(subprocess.run([sys.executable, "-c", CHILD, model, gpus, strategy], check=True,
                                          capture_output=True, text=True).stdout.strip().splitlines()[-1])
                for _ in range(args.repeats)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        ok = med["cold_s"] < target
        failed |= not ok
        print(f"{model:<16} {gpus:<12} {strategy:<8} {med['import_s']:>9.2f} {med['cold_s']:>8.3f} {med['warm_s']:>8.4f} "
              f"{'<' + str(target):>7}  {'yes' if ok else 'NO'}")
    print(f"# median of {args.repeats} fresh processes; 'cold' = plan() from the catalogue config after imports")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
