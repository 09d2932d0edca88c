"""The bundled captioner under every strategy on real GPUs, through ``vlmlab.caption``.

Real images (the bundled samples, repeated), real weights, the same call a notebook makes:
``caption(images, model=plan, profile=True)``. Prints, per strategy, how many captions equal the
references, which devices did the work, images/s and the profile's per-device peaks.

    python benchmarks/gpu_caption_strategies.py --repeat 16
"""
from __future__ import annotations

import argparse
import datetime
import json
import shutil
import tempfile
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=16, help="copies of the 8 samples")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--gpus", default=None, help="a vlmlab.gpus() spec, e.g. 4xcpu to try this on a CPU")
    args = ap.parse_args(argv)

    import torch
    import transformers

    import vlmlab
    from vlmlab.assets import SAMPLES_DIR

    reference = json.loads((SAMPLES_DIR / "captions.json").read_text())
    folder = Path(tempfile.mkdtemp(prefix="vlmlab-samples-"))
    for k in range(args.repeat):  # distinct files: the same path twice is one image to caption()
        for src in sorted((SAMPLES_DIR).glob("*.png")):
            shutil.copy(src, folder / f"copy{k:02d}_{src.name}")
    images = sorted(folder.glob("*.png"))
    hw = vlmlab.gpus(args.gpus)
    print(f"# {datetime.date.today().isoformat()}, {len(hw)}x {hw[0].name if len(hw) else 'none'}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; {len(images)} images, batch {args.batch_size}")
    runs = [("single", [0], {}), ("split", [0, 1], {}), ("replicate", [0, 1], {}), ("replicate", [0, 1, 2, 3], {}),
            ("hybrid", [0, 1, 2, 3], {"gpus_per_replica": 2})]
    failures = 0
    for strategy, idx, kw in runs:
        if len(idx) > len(hw):
            continue
        p = vlmlab.plan(gpus=hw.select(indices=idx), strategy=strategy, batch_size=args.batch_size, **kw)
        r = vlmlab.caption(images, model=p, batch_size=args.batch_size, progress=False, profile=True)
        df = r.to_pandas()
        hits = sum(reference.get(Path(str(i)).name.split("_", 1)[1]) == c for i, c in zip(df["image"], df["caption"]))
        prof = r.profile.to_dict() if r.profile is not None else {}
        ok = hits == len(images) and len(df) == len(images)
        failures += not ok
        print(f"{strategy:<9} on GPUs {idx}: {'OK ' if ok else 'BAD'} {hits}/{len(images)} captions equal the references; "
              f"rows {len(df)}; devices {sorted(df['device'].astype(str).unique())}; "
              f"{prof.get('images_per_s', float('nan')):.0f} images/s; replica profiles {len(prof.get('replicas', [])) or 1}; peaks "
              + ", ".join(f"{d} {b / 2**20:.0f} MiB" for d, b in sorted((prof.get("peak") or {}).items()))
              + "; measured vs predicted " + ", ".join(f"{d} {e:+.1f}%" for d, e in sorted((prof.get("error_pct") or {}).items())))
        vlmlab.unload()
    print("ALL OK" if not failures else f"{failures} strategies FAILED")
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
