"""Build the tiny VLM folders of every family (tests/tiny_vlms.py) offline, e.g. to try
``vlmlab.caption(images, model="tiny-vlms/qwen2_vl")`` by hand:

    python scripts/build_tiny_vlms.py tiny-vlms/                 # every family
    python scripts/build_tiny_vlms.py tiny-vlms/ qwen2_vl blip2  # some
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.tiny_vlms import FAMILIES, build  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to build the models in (one sub-folder per family)")
    parser.add_argument("families", nargs="*", metavar="family",
                        help=f"families to build (default: all of {', '.join(FAMILIES)})")
    args = parser.parse_args(argv)
    unknown = [f for f in args.families if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown family {', '.join(unknown)}; choose from {', '.join(FAMILIES)}")
    for family in args.families or FAMILIES:
        t0 = time.perf_counter()
        folder = build(family, args.out / family)
        size = sum(p.stat().st_size for p in folder.iterdir())
        print(f"{family:12s} {folder}  {size / 1e6:.1f} MB  {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
