"""Correctness on a GPU, not a measurement: the bundled captioner captions the bundled samples on
cuda:0 with each decode path of the fast generator (``--decodes``), and the captions are compared
with the reference captions the CPU demo checks.

    PYTHONPATH=. python benchmarks/gpu_smoke.py --decodes auto,graphs,compiled,eager --json out.json
"""
from __future__ import annotations

import argparse
import json


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decodes", default="auto,graphs,compiled,eager")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import vlmlab
    from vlmlab.assets import SAMPLES_DIR
    from vlmlab.run import fast_generate

    refs = json.loads((SAMPLES_DIR / "captions.json").read_text())
    images = [SAMPLES_DIR / name for name in sorted(refs)]
    out = {}
    for decode in args.decodes.split(","):
        fast_generate.DEFAULT_DECODE = decode
        vlmlab.unload()
        result = vlmlab.caption(images, model=None, batch_size=args.batch_size, progress=False)
        lm = vlmlab.loaded()[0] if vlmlab.loaded() else None
        kept = getattr(lm, "__dict__", {}).get("_generation", {}).get("auto") if lm is not None else None
        gen = kept[2] if kept else None
        same = sum(r["caption"] == refs[p.name] for p, r in zip(images, result.rows))
        out[decode] = {"match": f"{same}/{len(images)}", "errors": len(result.errors),
                       "generation": result.rows[0].get("generation") if result.rows else None,
                       "decode": sorted(set(getattr(gen, "decode_choice", {}).values())),
                       "fallbacks": getattr(gen, "fallbacks", None),
                       "replays": getattr(getattr(gen, "_step", None), "replays", None),
                       "captions": [r["caption"] for r in result.rows]}
        print(decode, json.dumps(out[decode]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
