"""A Profile: what one Profiler (or several replica workers, merged) saw — memory samples,
latency per stage and per device, throughput — as tables, JSON and plots."""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

from vlmlab.figures import GiB, png_html
from vlmlab.observe.hooks import COMPONENTS
from vlmlab.observe.sampler import MemorySampler, device_label


def _percentile(values, q):
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _stats(values) -> dict:
    n = len(values)
    return {"calls": n, "mean_ms": sum(values) / n if n else None, "p50_ms": _percentile(values, 50),
            "p95_ms": _percentile(values, 95), "total_ms": float(sum(values))}


@dataclass
class Profile:
    """What one Profiler saw. Bytes and milliseconds; devices as device maps write them
    (CUDA index as int, ``"cpu"``); labels ("GPU0", "cpu") in ``to_dict`` and tables.

    ``stages``: stage -> ms per call (``decode``: per step, i.e. per new token of each sequence).
    ``device_ms``: device -> stage -> component -> ms of hooked forward time.
    ``layer_ms``: per decoder layer, ms (zeros with ``detail="devices"``).
    ``steps``: timeline of vision calls and model forwards (seconds since the profiler started).
    ``samples``: memory rows (see :class:`MemorySampler`), same time axis.
    ``peaks``: device -> maxima (allocated, reserved, nvml_used, rss; on CUDA also torch's
    max_allocated / max_reserved over the window). ``predicted``: device -> bytes from the plan.
    """

    model: str
    devices: list
    wall_s: float
    images: int | None
    tokens: int | None
    stages: dict
    device_ms: dict
    layer_ms: list
    layer_devices: list
    steps: list
    samples: list
    peaks: dict
    predicted: dict = field(default_factory=dict)
    interval: float | None = 0.05
    detail: str = "layers"
    notes: list = field(default_factory=list)
    replicas: list = field(default_factory=list)  # a run over worker processes: each worker's own Profile
    rates: dict = field(default_factory=dict)  # achieved prefill TFLOP/s, decode GB/s, % of peak (observe.roofline)

    # -- numbers ----------------------------------------------------------------------------
    @property
    def latency(self) -> dict:
        """Stage -> {calls, mean_ms, p50_ms, p95_ms, total_ms} for stages that ran."""
        return {s: _stats(v) for s, v in self.stages.items() if v}

    @property
    def generate_calls(self) -> int:
        return len(self.stages.get("prefill", []))

    @property
    def images_per_s(self) -> float | None:
        return self.images / self.wall_s if self.images is not None and self.wall_s > 0 else None

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.wall_s if self.tokens is not None and self.wall_s > 0 else None

    def forward_ms(self) -> dict:
        """Device -> hooked forward ms in all (every stage and component)."""
        return {d: sum(ms for comps in stages.values() for ms in comps.values())
                for d, stages in self.device_ms.items()}

    def peak(self) -> dict:
        """Device -> measured peak bytes comparable with the plan's prediction: NVML used (it counts
        the CUDA context, as the prediction does) where available, else torch's max reserved, else
        the largest reserved sample; the process RSS for "cpu"."""
        out = {}
        for d in self.devices:
            p = self.peaks.get(d, {})
            for key in ("nvml_used", "max_reserved", "reserved", "rss"):
                if p.get(key) is not None:
                    out[d] = int(p[key])
                    break
        return out

    def peak_basis(self) -> dict:
        out = {}
        for d in self.devices:
            p = self.peaks.get(d, {})
            out[d] = next((k for k in ("nvml_used", "max_reserved", "reserved", "rss") if p.get(k) is not None), None)
        return out

    def error_pct(self) -> dict:
        """Device -> (measured - predicted) / predicted in %, where both are known. Not on the CPU: the
        memory model predicts what a GPU holds, and a process's RSS (its whole Python and torch runtime)
        is not that, so a percentage there would be noise."""
        measured, basis = self.peak(), self.peak_basis()
        return {d: 100.0 * (measured[d] - p) / p for d, p in self.predicted.items()
                if d in measured and p and basis.get(d) != "rss"}

    # -- tables -----------------------------------------------------------------------------
    def to_pandas(self) -> dict:
        """A dict of DataFrames:

        - ``"memory"``: the samples, one row per (time, device): t, device, allocated, reserved,
          nvml_used, rss (bytes);
        - ``"calls"``: tidy per-call latencies: stage, call, ms;
        - ``"latency"``: per stage: calls, mean_ms, p50_ms, p95_ms, total_ms;
        - ``"devices"``: per device: forward_ms, ms per component, peak (and its basis), predicted,
          error_pct;
        - ``"layers"``: per decoder layer: device, ms;
        - ``"summary"``: one row: wall_s, images, tokens, images_per_s, tokens_per_s, generate_calls.
        """
        import pandas as pd

        memory = pd.DataFrame(self.samples, columns=list(MemorySampler.FIELDS))
        calls = pd.DataFrame([{"stage": s, "call": i, "ms": ms} for s, v in self.stages.items() for i, ms in enumerate(v)],
                             columns=["stage", "call", "ms"])
        latency = pd.DataFrame([{"stage": s, **st} for s, st in self.latency.items()],
                               columns=["stage", "calls", "mean_ms", "p50_ms", "p95_ms", "total_ms"]).set_index("stage")
        devices = pd.DataFrame(self._device_rows()).set_index("device") if self.devices else pd.DataFrame()
        layers = pd.DataFrame([{"layer": i, "device": device_label(d), "ms": ms}
                               for i, (d, ms) in enumerate(zip(self.layer_devices, self.layer_ms))],
                              columns=["layer", "device", "ms"])
        summary = pd.DataFrame([self._summary()])
        return {"memory": memory, "calls": calls, "latency": latency, "devices": devices, "layers": layers,
                "summary": summary}

    def _device_rows(self) -> list[dict]:
        fwd, peak, basis, err = self.forward_ms(), self.peak(), self.peak_basis(), self.error_pct()
        rows = []
        for d in self.devices:
            comps = {c: 0.0 for c in COMPONENTS}
            for stage in self.device_ms.get(d, {}).values():
                for c, ms in stage.items():
                    comps[c] += ms
            rows.append({"device": device_label(d), "forward_ms": fwd.get(d, 0.0),
                         **{f"{c}_ms": v for c, v in comps.items()}, "peak": peak.get(d), "peak_basis": basis.get(d),
                         "predicted": self.predicted.get(d), "error_pct": err.get(d)})
        return rows

    def _summary(self) -> dict:
        return {"model": self.model, "wall_s": self.wall_s, "images": self.images, "tokens": self.tokens,
                "images_per_s": self.images_per_s, "tokens_per_s": self.tokens_per_s,
                "generate_calls": self.generate_calls}

    def to_dict(self, samples: bool = True, calls: bool = True) -> dict:
        """Plain JSON-able data (device labels as keys). ``samples``/``calls``: include the memory
        samples and the per-call latencies (the bulky parts)."""
        out = {**self._summary(), "devices": [device_label(d) for d in self.devices], "detail": self.detail,
               "interval": self.interval, "latency": self.latency,
               "device_ms": {device_label(d): v for d, v in self.device_ms.items()},
               "forward_ms": {device_label(d): v for d, v in self.forward_ms().items()},
               "layers": [{"device": device_label(d), "ms": ms} for d, ms in zip(self.layer_devices, self.layer_ms)],
               "peak": {device_label(d): v for d, v in self.peak().items()},
               "peak_basis": {device_label(d): v for d, v in self.peak_basis().items()},
               "peaks": {device_label(d): v for d, v in self.peaks.items()},
               "predicted": {device_label(d): v for d, v in self.predicted.items()},
               "error_pct": {device_label(d): v for d, v in self.error_pct().items()},
               "notes": list(self.notes)}
        if self.rates:
            out["rates"] = dict(self.rates)
        if self.replicas:
            out["replicas"] = [r.to_dict(samples=False, calls=False) for r in self.replicas]
        if calls:
            out["calls"] = {s: list(v) for s, v in self.stages.items()}
            out["steps"] = list(self.steps)
        if samples:
            out["samples"] = [{**r, "device": device_label(r["device"])} for r in self.samples]
        return _jsonable(out)

    # -- pictures ---------------------------------------------------------------------------
    def plot_memory(self, ax=None, figsize=(7, 3.5)):
        """Memory over time per device, the plan's prediction dotted, vision/prefill shaded."""
        from vlmlab.observe.plots import memory_timeline

        fig = memory_timeline(self.samples, ax=ax, figsize=figsize, predicted=self.predicted)
        ax = fig.axes[0] if ax is None else ax
        spans = [s for s in self.steps if s["stage"] in ("vision encode", "prefill")]
        if len(spans) <= 200:
            colours = {"vision encode": "#4c72b0", "prefill": "#55a868"}
            seen = set()
            for s in spans:
                label = None if s["stage"] in seen else s["stage"]
                seen.add(s["stage"])
                ax.axvspan(s["start"], max(s["end"], s["start"] + 1e-4), color=colours[s["stage"]], alpha=0.12,
                           lw=0, label=label)
            if spans:
                ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
        return fig

    def plot_latency(self, ax=None, figsize=(6, 3.5), per: str = "call"):
        from vlmlab.observe.plots import latency_breakdown

        return latency_breakdown(self, ax=ax, figsize=figsize, per=per)

    def __repr__(self):
        lat = ", ".join(f"{s} {st['p50_ms']:.2f} ms" for s, st in self.latency.items())
        tp = f", {self.tokens_per_s:.1f} tokens/s" if self.tokens_per_s is not None else ""
        return f"Profile({self.model}, {self.wall_s:.2f} s{tp}; p50 {lat or 'no stage ran'})"

    def _repr_html_(self):
        esc = html.escape

        def num(v, fmt="{:.2f}"):
            return "" if v is None else fmt.format(v)

        s = self._summary()
        head = (f"<b>{esc(self.model)}</b> — {s['wall_s']:.2f} s wall, {s['generate_calls']} generate call(s)"
                + (f", {s['images_per_s']:.2f} images/s" if s["images_per_s"] is not None else "")
                + (f", {s['tokens_per_s']:.1f} tokens/s" if s["tokens_per_s"] is not None else ""))
        lat = "".join(f"<tr><td>{esc(n)}</td><td>{st['calls']}</td><td>{num(st['mean_ms'])}</td><td>{num(st['p50_ms'])}</td>"
                      f"<td>{num(st['p95_ms'])}</td></tr>" for n, st in self.latency.items())
        lat_t = (f"<table><tr><th>stage</th><th>calls</th><th>mean ms</th><th>p50 ms</th><th>p95 ms</th></tr>{lat}</table>"
                 f"<small>decode: per token (one step)</small>")
        dev = "".join(f"<tr><td>{esc(r['device'])}</td><td>{r['forward_ms']:.1f}</td>"
                      f"<td>{num(r['peak'] / GiB if r['peak'] is not None else None)} GiB ({esc(str(r['peak_basis']))})</td>"
                      f"<td>{num(r['predicted'] / GiB if r['predicted'] is not None else None)}</td>"
                      f"<td>{num(r['error_pct'], '{:+.1f}%')}</td></tr>" for r in self._device_rows())
        dev_t = (f"<table><tr><th>device</th><th>forward ms</th><th>peak measured</th><th>predicted GiB</th>"
                 f"<th>error</th></tr>{dev}</table>")
        notes = "".join(f"<li>{esc(n)}</li>" for n in self.notes)
        if self.rates:
            from vlmlab.observe.roofline import describe

            head += f"<br>{esc(describe(self.rates))}" if describe(self.rates) else ""
        return (f"<div class='vlmlab-profile'>{head}<div style='display:flex;gap:1em;align-items:flex-start'>"
                f"<div>{lat_t}</div><div>{dev_t}</div></div>"
                f"<div style='display:flex;gap:1em'>{png_html(self.plot_memory(figsize=(5.5, 3)))}"
                f"{png_html(self.plot_latency(figsize=(4.5, 3)))}</div>"
                f"{'<ul>' + notes + '</ul>' if notes else ''}</div>")


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if x is None or isinstance(x, (str, int, bool)):
        return x
    if hasattr(x, "item"):  # numpy / torch scalars
        return _jsonable(x.item())
    return str(x)
