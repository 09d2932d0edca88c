"""Predicted vs measured peak memory per device, for plans of a random-weight model.

For each strategy: plan the model on this machine's GPUs, build it with random weights on the
planned devices (vlmlab.load(plan, random_weights=True)), run one caption-shaped ``generate`` at
the plan's batch size with a fixed number of new tokens, and compare the plan's predicted peak per
device with what the device held at its peak:

  measured = torch max_memory_reserved  +  non-torch memory (CUDA context, cuBLAS workspace),
  nvml     = the NVML "used" peak sampled every 5 ms during load + generate (what nvidia-smi shows).

    python benchmarks/gpu_memory.py --model llava-1.5-7b --batch-size 16 --new-tokens 32 \
        --strategies single,split --gpus 2 --json out.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import threading
import time

GiB = 1024**3


class NvmlPeak:
    """Samples NVML memory-used per device in a thread; .peak[i] is the max seen (bytes)."""

    def __init__(self, indices, interval=0.005):
        self.indices, self.interval, self.peak, self._stop = indices, interval, {}, threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            from vlmlab.hardware import visible_nvml_indices

            uuids = [pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i)) for i in range(pynvml.nvmlDeviceGetCount())]
            uuids = [u.decode() if isinstance(u, bytes) else u for u in uuids]
            nv = visible_nvml_indices(os.environ.get("CUDA_VISIBLE_DEVICES"), uuids)
            self.handles = {i: pynvml.nvmlDeviceGetHandleByIndex(nv[i]) for i in indices}
        except Exception:  # noqa: BLE001 - no NVML: report torch numbers only
            self._nvml, self.handles = None, {}

    def used(self, i):
        return self._nvml.nvmlDeviceGetMemoryInfo(self.handles[i]).used if self._nvml else 0

    def _run(self):
        while not self._stop.is_set():
            for i in self.handles:
                self.peak[i] = max(self.peak.get(i, 0), self.used(i))
            time.sleep(self.interval)

    def __enter__(self):
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def run(model, strategy, batch_size, new_tokens, n_gpus):
    import torch

    import vlmlab
    from vlmlab.model.dummy_inputs import caption_inputs

    hw = vlmlab.gpus()
    hw = hw.select(indices=list(range(min(n_gpus, len(hw))))) if hw else vlmlab.gpus("cpu")
    plan = vlmlab.plan(model, gpus=hw, strategy=strategy, dtype="bfloat16", batch_size=batch_size,
                       max_new_tokens=new_tokens)
    cuda = not hw.is_cpu
    indices = sorted(plan.memory)
    baseline = {}
    if cuda:
        for i in indices:  # create the context and cuBLAS workspace, then read what torch does not own
            torch.ones(1, device=f"cuda:{i}") @ torch.ones(1, device=f"cuda:{i}")
        torch.cuda.synchronize()
    with NvmlPeak(indices) as nv:
        if cuda:
            baseline = {i: nv.used(i) - torch.cuda.memory_reserved(i) for i in indices}
            for i in indices:
                torch.cuda.reset_peak_memory_stats(i)
        t0 = time.perf_counter()
        lm = vlmlab.load(plan, random_weights=True)
        t_load = time.perf_counter() - t0
        weights = {i: torch.cuda.memory_allocated(i) for i in indices} if cuda else {}
        inputs = caption_inputs(plan._spec(), batch_size, plan.workload.prompt_tokens, device=lm.input_device,
                                dtype=torch.bfloat16)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = lm.model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        if cuda:
            torch.cuda.synchronize()
        t_gen = time.perf_counter() - t0
    rows = []
    for i in indices:
        pred = plan.memory[i]
        row = {"device": i, "predicted": sum(pred.values()), "predicted_breakdown": pred}
        if cuda:
            row.update(weights=weights[i], allocated=torch.cuda.max_memory_allocated(i), reserved=torch.cuda.max_memory_reserved(i),
                       context=baseline[i], nvml_peak=nv.peak.get(i, 0))
            row["measured"] = row["reserved"] + row["context"]
            row["error_pct"] = 100 * (row["predicted"] - row["measured"]) / row["measured"]
        rows.append(row)
    result = {"strategy": plan.strategy, "gpus": plan.replicas[0].gpus, "batch_size": batch_size,
              "new_tokens": new_tokens, "generated": list(out.shape), "load_s": t_load, "generate_s": t_gen,
              "devices": rows}
    vlmlab.unload()
    del lm, out
    if cuda:
        torch.cuda.empty_cache()
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llava-1.5-7b")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--strategies", default="single,split")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch
    import transformers

    env = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "transformers": transformers.__version__,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "gpu_count": torch.cuda.device_count()}
    print(f"# {env}")
    print(f"# {args.model}, bf16, batch {args.batch_size}, {args.new_tokens} new tokens, random weights")
    print(f"{'strategy':<9} {'dev':>3} {'predicted':>10} {'measured':>9} {'error':>7} {'allocated':>10} {'reserved':>9} "
          f"{'context':>8} {'nvml peak':>9}   (GiB)")
    results = []
    for strategy in args.strategies.split(","):
        r = run(args.model, strategy, args.batch_size, args.new_tokens, args.gpus)
        results.append(r)
        for d in r["devices"]:
            if "measured" in d:
                print(f"{r['strategy']:<9} {d['device']:>3} {d['predicted'] / GiB:>10.2f} {d['measured'] / GiB:>9.2f} "
                      f"{d['error_pct']:>+6.1f}% {d['allocated'] / GiB:>10.2f} {d['reserved'] / GiB:>9.2f} "
                      f"{d['context'] / GiB:>8.2f} {d['nvml_peak'] / GiB:>9.2f}")
            else:
                print(f"{r['strategy']:<9} {d['device']!s:>3} {d['predicted'] / GiB:>10.2f}  (no GPU: nothing measured)")
        print(f"#   load {r['load_s']:.1f} s, generate {r['generate_s']:.1f} s, output {r['generated']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
