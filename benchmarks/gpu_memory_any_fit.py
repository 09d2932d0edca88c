"""Predicted vs measured peak for the runs of benchmarks/gpu_memory_any.py (no GPU needed).

For each measured run: rebuild the spec from the config the GPU run saved, count its image tokens
at the run's image size (they must equal the run's), predict the single-GPU peak with the memory
model for the run's batch, prompt and 32 new tokens, and compare with

    measured = torch max_memory_reserved + the non-torch memory (CUDA context, cuBLAS workspace,
               kernels): CUDA_CONTEXT, measured at 1.27-1.29 GiB on H200 (gpu_memory_calibration.txt).

The run's own "context_gib" (driver used - reserved right after loading) is lower (0.68 GiB)
because it is read before the first matmul creates cuBLAS's workspace.

    python benchmarks/gpu_memory_any_fit.py benchmarks/results/gpu_memory_any.jsonl
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
GiB = 1024**3


def runs(path) -> list[tuple[dict, list[dict]]]:
    """(header, lines) of each GPU run appended to ``path`` (one header line starts a run)."""
    out = []
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        if "header" in row or not out:
            out.append((row.get("header", {}), []))
        if "header" not in row:
            out[-1][1].append(row)
    return out


def rows(path, last_run_only=False):
    chosen = runs(path)[-1:] if last_run_only else runs(path)
    for _, lines in chosen:
        for row in lines:
            if "batch" in row and "error" not in row:
                yield row


def predict(row):
    from transformers import AutoConfig

    import vlmlab
    from vlmlab.model.memory import CUDA_CONTEXT, Workload, device_memory

    cfg = dict(row["config"])
    model_type = cfg.pop("model_type")
    for key in ("transformers_version", "architectures"):
        cfg.pop(key, None)
    config = AutoConfig.for_model(model_type, **cfg)
    ms = vlmlab.spec(config).at(tuple(row["image_size"]), image_tokens=None)
    d = ms.dims
    prompt = row["prompt_tokens"] - max(d.image_sequence, d.image_tokens)
    work = Workload(row["batch"], row["new_tokens"], max(prompt, 1))
    b = device_memory(ms.units, d, work, "bfloat16", keeps_vision_states=ms.family.keeps_vision_states)
    return ms, b, CUDA_CONTEXT


def main(path):
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    header, lines = runs(path)[-1]
    gpu = next((r["gpu"] for r in lines if "gpu" in r), header.get("gpu", "?"))
    print(f"# last run in {path}: {gpu}, {header.get('date', '?')}, torch {header.get('torch', '?')}, "
          f"transformers {header.get('transformers', '?')}; predicted with transformers {transformers.__version__}")
    for r in lines:
        if "error" in r:
            print(f"# {r['model']}: {r['error'].splitlines()[0][:160]}")
    print(f"{'model':14s} {'batch':>5s} {'tokens':>6s} {'pred':>7s} {'meas':>7s} {'err':>7s}  "
          f"{'weights':>7s} {'kv':>6s} {'act':>6s} {'alloc-w':>7s} {'slack':>6s}   (GiB)")
    errors = []
    for row in rows(path, last_run_only=True):
        ms, b, context = predict(row)
        pred = sum(b.values()) / GiB
        meas = row["max_reserved_gib"] + context / GiB
        err = (pred - meas) / meas
        errors.append((row["model"], row["batch"], err))
        weights = sum(b[c] for c in ("vision", "projector", "embeddings", "layers", "norm", "head", "other")) / GiB
        print(f"{row['model']:14s} {row['batch']:5d} {ms.dims.image_tokens:6d} {pred:7.2f} {meas:7.2f} {err:+7.1%}  "
              f"{weights:7.2f} {b['kv_cache'] / GiB:6.2f} {b['activations'] / GiB:6.2f} "
              f"{row['max_allocated_gib'] - row['weights_gib']:7.2f} "
              f"{row['max_reserved_gib'] - row['max_allocated_gib']:6.2f}")
    inside = sum(abs(e) <= 0.05 for *_, e in errors)
    under = [(m, bs, f"{e:+.1%}") for m, bs, e in errors if e < -0.05]
    families = {m for m, *_ in errors}
    whole = sorted(f for f in families if sum(m == f and abs(e) <= 0.05 for m, _, e in errors) >= 3)
    print(f"within +-5%: {inside} of {len(errors)} runs; families within at 3 batch sizes: {len(whole)} "
          f"({', '.join(whole)}); worst under: {min(e for *_, e in errors):+.1%}; under by more than 5%: {under or 'none'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/gpu_memory_any.jsonl")
