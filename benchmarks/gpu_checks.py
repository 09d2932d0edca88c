"""Checks that need a real GPU (and the GPU machines' transformers 5.17), printed as a report:

1. the bundled captioner loads with this transformers and captions the bundled samples on GPU;
2. the double-load guard refuses a second copy on the same GPU;
3. ``unload()`` gives the memory back (NVML "used" before load, after load, after unload);
4. a profiled caption run on GPU (CUDA-event timing path) yields stage latencies.

    python benchmarks/gpu_checks.py
"""
from __future__ import annotations

import datetime
import json
import sys
import traceback
from pathlib import Path

GiB = 1024**3


def nvml_used(index: int) -> int:
    import pynvml

    pynvml.nvmlInit()
    return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).used


def main() -> int:
    import torch
    import transformers

    import vlmlab
    from vlmlab.assets import SAMPLES_DIR

    ok = True
    print(f"# {datetime.date.today()}, {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")

    samples = sorted((SAMPLES_DIR).glob("*.png"))
    for step in (_bundled, _guard, _unload, _profiled):
        try:
            ok &= step(samples)
        except Exception:  # noqa: BLE001 - report and go on to the next check
            traceback.print_exc()
            ok = False
        vlmlab.unload()
    print("ALL OK" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


def _bundled(samples):
    import vlmlab
    from vlmlab.assets import SAMPLES_DIR

    reference = json.loads((SAMPLES_DIR / "captions.json").read_text())
    lm = vlmlab.load(gpus=[0], dtype="bfloat16")
    print(f"1. bundled captioner loaded on {lm.devices} in {lm.dtype}")
    result = vlmlab.caption(samples, model=lm, progress=False)
    df = result.to_pandas()
    hits = sum(reference.get(Path(r.image).name) == r.caption for r in df.itertuples())
    print(f"   {hits}/{len(df)} sample captions equal the references; device {df['device'].iloc[0]}")
    for r in df.itertuples():
        print(f"     {Path(r.image).name}: {r.caption!r}")
    return hits >= len(df) - 1


def _guard(samples):
    import vlmlab
    from vlmlab.run.loading import AlreadyLoadedError

    vlmlab.load(gpus=[0], dtype="bfloat16")
    try:
        vlmlab.load(gpus=[0], dtype="bfloat16")
        print("2. double-load guard: NOT refused")
        return False
    except AlreadyLoadedError as err:
        print(f"2. double-load guard refused the second copy: {str(err)[:120]}...")
        return True


def _unload(samples):
    import torch

    import vlmlab

    torch.cuda.synchronize()
    before = nvml_used(0)
    big = vlmlab.load("llava-1.5-7b", gpus=[0], strategy="single", random_weights=True)
    after_load = nvml_used(0)
    vlmlab.unload(big)
    del big
    after_unload = nvml_used(0)
    print(f"3. NVML used on GPU0: before {before / GiB:.2f} GiB, llava-1.5-7b loaded {after_load / GiB:.2f} GiB, "
          f"after unload {after_unload / GiB:.2f} GiB (freed {(after_load - after_unload) / GiB:.2f} GiB)")
    return after_unload - before < 0.5 * GiB and after_load - before > 12 * GiB


def _profiled(samples):
    import vlmlab

    result = vlmlab.caption(samples, progress=False, profile=True, gpus=[0], dtype="bfloat16")
    prof = result.profile
    print("4. profiled caption run on GPU:")
    print("   " + json.dumps(prof.to_dict(samples=False, calls=False), default=str)[:1500])
    return True


if __name__ == "__main__":
    sys.exit(main())
