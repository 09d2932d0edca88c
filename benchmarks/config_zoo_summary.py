"""Every image-text-to-text model type transformers can build here: spec, then a split plan.

Each type's default config, shrunk to 2 layers per stack (tests/config_zoo.py), plus a few at
their published (default) size, is read by vlmlab.spec and planned with strategy='split' on two
virtual 80 GiB GPUs. Each either plans (checked: every parameter placed once, vision tower /
projector / embeddings on one device, tied weights on one device, image tokens from the model's
own processor or config) or is refused with a specific message; anything else is a crash.

    python benchmarks/config_zoo_summary.py [--json benchmarks/results/config_zoo.json]

Image processors that need torchvision build only where it imports, so the environment (torch,
torchvision, transformers) is printed first and stored in the json. Committed runs: without
torchvision (this repo's CI environment) -> results/config_zoo.{txt,json}; with torchvision (as
on a GPU machine) -> results/config_zoo_torchvision.{txt,json}; their difference per type:
``--compare results/config_zoo_torchvision.json results/config_zoo.json`` -> results/config_zoo_compare.txt.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--types", default=None, help="comma-separated subset")
    ap.add_argument("--compare", nargs=2, metavar=("WITH_TORCHVISION_JSON", "WITHOUT_JSON"), default=None,
                    help="compare two runs' image tokens per type instead of running")
    args = ap.parse_args()
    if args.compare:
        return compare(*args.compare)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    from tests import config_zoo

    env = environment()
    print("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    types = args.types.split(",") if args.types else config_zoo.image_text_types()
    rows = []
    t0 = time.time()
    for small in (True, False):
        for t in types if small else [t for t in config_zoo.PUBLISHED if t in types]:
            t1 = time.time()
            row = config_zoo.check(t, small=small)
            row["seconds"] = round(time.time() - t1, 2)
            rows.append(row)
            extra = row.get("message", "") if row["outcome"] != "plan" else \
                f"{row['image_tokens']} image tokens ({row['image_tokens_source']}), " \
                f"covered={row['covered']} colocated={row['colocated']} tied_kept={row['tied_kept']}"
            print(f"{t:24s} {row['size']:9s} {row['outcome']:11s} {extra[:150]}", flush=True)
    buildable = [r for r in rows if r["outcome"] != "unbuildable"]
    counts = collections.Counter(r["outcome"] for r in buildable)
    planned = [r for r in buildable if r["outcome"] == "plan"]
    summary = {
        "date": datetime.date.today().isoformat(), "transformers": transformers.__version__, "environment": env,
        "types": len(types), "rows": len(rows), "buildable": len(buildable),
        "unbuildable": sorted(r["model_type"] for r in rows if r["outcome"] == "unbuildable"),
        "plan": counts["plan"], "refused": counts["refused"], "crash": counts["crash"],
        "plan_rate": round(counts["plan"] / max(len(buildable), 1), 3),
        "refused_for_image_tokens": sum(str(r.get("message", "")).startswith("ImageTokensUnknown") for r in buildable),
        "of_which_need_torchvision": sum("Torchvision" in str(r.get("message", "")) for r in buildable),
        "plan_once_image_tokens_given": sum(r.get("plans_with_image_tokens") is True for r in buildable),
        "image_tokens_by": dict(collections.Counter(str(r["image_tokens_source"]).split(" (")[0] for r in planned)),
        "silent_borrowings": sum(r["borrowed"] for r in planned),
        "coverage_failures": sum(not r["covered"] for r in planned),
        "colocation_failures": sum(not r["colocated"] for r in planned),
        "tied_failures": sum(not r["tied_kept"] for r in planned),
        "seconds": round(time.time() - t0, 1),
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1, default=str))


def compare(with_json: str, without_json: str):
    """Types that plan in both runs with different image tokens: the processor's count (with
    torchvision) against the fallback used without it (mostly the model's image path on meta)."""
    runs = [{(r["model_type"], r["size"]): r for r in json.loads(Path(p).read_text())["rows"]}
            for p in (with_json, without_json)]
    same = 0
    print(f"{'model_type':24s} {'with':>6s} {'without':>8s} {'diff':>7s}  without torchvision, counted by")
    for key in sorted(runs[0]):
        a, b = runs[0][key], runs[1].get(key, {})
        if a["outcome"] != "plan" or b.get("outcome") != "plan":
            continue
        if a["image_tokens"] == b["image_tokens"]:
            same += 1
            continue
        diff = (b["image_tokens"] - a["image_tokens"]) / a["image_tokens"]
        print(f"{key[0]:24s} {a['image_tokens']:6d} {b['image_tokens']:8d} {diff:+7.0%}  {b['image_tokens_source']}")
    print(f"{same} rows plan in both with the same image tokens")


def environment() -> dict:
    """The versions the counts depend on: image processors that need torchvision are only built
    where it imports."""
    import platform

    import torch
    import transformers

    try:
        import torchvision

        vision = torchvision.__version__
    except Exception as err:  # noqa: BLE001 - not installed, or a build that does not match torch
        vision = f"not importable ({type(err).__name__})"
    import os
    import subprocess

    import vlmlab

    root = Path(vlmlab.__file__).resolve().parents[1]
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or os.environ.get("VLMLAB_COMMIT", "unknown")
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": vision,
            "transformers": transformers.__version__, "vlmlab": f"{root} at {commit}"}


if __name__ == "__main__":
    main()
