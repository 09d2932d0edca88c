"""Matplotlib pictures. Each function returns a Figure built without pyplot, so a notebook shows
it once (as the cell's value) and scripts can ``savefig`` it; nothing here touches global state."""
from __future__ import annotations

GiB = 1024**3


def _figure(ax, figsize):
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def plan_bars(plan, ax=None, figsize=(7, 4)):
    """One stacked bar per device: weights by role, KV cache, activations, context, free; a capacity line."""
    from .plans import PICTURE

    fig, ax = _figure(ax, figsize)
    indices = sorted(plan.memory)
    labels = [plan.hardware.by_index(i).label for i in indices]
    bottoms = [0.0] * len(indices)
    for name, comps, colour in PICTURE:
        values = [sum(plan.memory[i].get(c, 0.0) for c in comps) / GiB for i in indices]
        if any(values):
            ax.bar(labels, values, bottom=bottoms, label=name, color=colour, width=0.6)
            bottoms = [b + v for b, v in zip(bottoms, values)]
    caps = [plan.hardware.by_index(i).free / GiB for i in indices]
    free = [max(c - b, 0.0) for c, b in zip(caps, bottoms)]
    ax.bar(labels, free, bottom=bottoms, label="free", color="#f0f0f0", edgecolor="#bbbbbb", width=0.6)
    for x, (cap, used) in enumerate(zip(caps, bottoms)):
        ax.hlines(cap, x - 0.4, x + 0.4, colors="black", linewidth=1.5)
        ax.text(x, max(cap, used) * 1.01, f"{used:.1f}/{cap:.0f} GiB", ha="center", va="bottom", fontsize=8,
                color="#c44e52" if used > cap else "black")
    ax.set_ylabel("GiB")
    ax.set_ylim(0, max(caps + bottoms) * 1.12)
    ax.set_title(f"{plan.model} · {plan.strategy} · {plan.dtype} · batch {plan.batch_size}", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return fig


def _frame(data):
    import pandas as pd

    return data if isinstance(data, pd.DataFrame) else pd.DataFrame(list(data))


def _device_name(d):
    return f"GPU{d}" if isinstance(d, int) else str(d)


def memory_timeline(samples_df, ax=None, figsize=(7, 3.5), predicted=None):
    """Memory over time, one colour per device: allocated solid, reserved dashed (CUDA); the process
    RSS solid for "cpu". ``samples_df``: MemorySampler rows (DataFrame or list of dicts: t, device,
    allocated, reserved, rss). ``predicted``: optional {device: bytes}, drawn dotted."""
    fig, ax = _figure(ax, figsize)
    df = _frame(samples_df)
    if df.empty or "device" not in df:
        ax.text(0.5, 0.5, "no memory samples", ha="center", va="center", transform=ax.transAxes)
        return fig
    predicted = predicted or {}
    devices = list(dict.fromkeys(df["device"].tolist()))
    for i, dev in enumerate(devices):
        g = df[df["device"].map(lambda d: d == dev)].sort_values("t")
        colour, name = f"C{i % 10}", _device_name(dev)
        alloc = g["allocated"] if "allocated" in g else None
        if alloc is not None and alloc.notna().any():
            ax.plot(g["t"], alloc / GiB, color=colour, ls="-", lw=1.5, label=f"{name} allocated")
        elif "rss" in g and g["rss"].notna().any():
            ax.plot(g["t"], g["rss"] / GiB, color=colour, ls="-", lw=1.5, label=f"{name} RSS")
        elif "nvml_used" in g and g["nvml_used"].notna().any():
            ax.plot(g["t"], g["nvml_used"] / GiB, color=colour, ls="-", lw=1.5, label=f"{name} used (NVML)")
        if "reserved" in g and g["reserved"].notna().any():
            ax.plot(g["t"], g["reserved"] / GiB, color=colour, ls="--", lw=1.2, label=f"{name} reserved")
        if predicted.get(dev):
            ax.axhline(predicted[dev] / GiB, color=colour, ls=":", lw=1.2, label=f"{name} predicted")
    ax.set_xlabel("seconds")
    ax.set_ylabel("GiB")
    ax.set_ylim(bottom=0)
    ax.set_title("memory per device", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return fig


def latency_breakdown(profile, ax=None, figsize=(6, 3.5), per="call"):
    """One bar per stage (vision encode, prefill, decode), stacked by device: the hooked forward
    time each device spent in that stage, plus "other" (embeddings, host overhead, copies between
    devices, sampling: the stage's time outside hooked modules). ``per="call"``: ms per call (per
    token for decode); ``per="total"``: ms over the whole profile. Every stage gets one segment per
    device and one "other" segment, zero-height where nothing was spent."""
    fig, ax = _figure(ax, figsize)
    stages = [s for s in ("vision encode", "prefill", "decode") if profile.stages.get(s)]
    if not stages:
        ax.text(0.5, 0.5, "no stage ran", ha="center", va="center", transform=ax.transAxes)
        return fig
    devices = list(profile.devices)
    bottoms = [0.0] * len(stages)

    def per_stage(stage, ms):
        return ms / len(profile.stages[stage]) if per == "call" else ms

    device_total = {s: 0.0 for s in stages}
    for i, dev in enumerate(devices):
        values = []
        for s in stages:
            ms = sum(profile.device_ms.get(dev, {}).get(s, {}).values())
            device_total[s] += ms
            values.append(per_stage(s, ms))
        ax.bar(stages, values, bottom=bottoms, color=f"C{i % 10}", width=0.6, label=_device_name(dev))
        bottoms = [b + v for b, v in zip(bottoms, values)]
    stage_total = {s: sum(profile.stages[s]) for s in stages}
    if "vision encode" in stage_total:  # the stage's time is its modules' time (projector included)
        stage_total["vision encode"] = max(stage_total["vision encode"], device_total["vision encode"])
    other = [per_stage(s, max(stage_total[s] - device_total[s], 0.0)) for s in stages]
    ax.bar(stages, other, bottom=bottoms, color="#c8c8c8", width=0.6, label="other")
    for x, (b, o) in enumerate(zip(bottoms, other)):
        ax.text(x, b + o, f"{b + o:.2f}" if b + o < 100 else f"{b + o:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("ms per call (decode: per token)" if per == "call" else "ms in all")
    ax.set_title(f"{profile.model} · latency by stage and device", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return fig


def strategy_comparison(df, metric="images_per_s", ax=None, figsize=(7, 3.5)):
    """Grouped bars: one group per batch size, one bar per strategy, height ``metric`` (a column:
    images_per_s, p50_ms, p95_ms, a peak column in bytes — shown in GiB ...). With
    ``metric="p50_ms"`` and a p95_ms column, a whisker reaches up to p95. Rows repeated for one
    (strategy, batch size) are averaged."""
    fig, ax = _figure(ax, figsize)
    df = _frame(df)
    if df.empty or metric not in df:
        ax.text(0.5, 0.5, f"no {metric} to compare", ha="center", va="center", transform=ax.transAxes)
        return fig
    df = df.copy()
    if "batch_size" not in df:
        df["batch_size"] = 1
    if "strategy" not in df:
        df["strategy"] = "run"
    cols = [metric] + (["p95_ms"] if metric == "p50_ms" and "p95_ms" in df else [])
    table = df.groupby(["strategy", "batch_size"], sort=False)[cols].mean()
    scale, unit = 1.0, metric
    if metric.startswith("peak"):
        scale, unit = 1 / GiB, f"{metric} (GiB)"
    strategies = list(dict.fromkeys(df["strategy"].tolist()))
    batches = sorted(set(df["batch_size"].tolist()))
    width = 0.8 / len(strategies)
    for j, strat in enumerate(strategies):
        xs, ys, err = [], [], []
        for k, b in enumerate(batches):
            if (strat, b) in table.index:
                row = table.loc[(strat, b)]
                xs.append(k - 0.4 + width * (j + 0.5))
                ys.append(float(row[metric]) * scale)
                err.append(float(row["p95_ms"] - row[metric]) * scale if "p95_ms" in cols else 0.0)
        kw = {"yerr": [[0.0] * len(err), err], "capsize": 3} if "p95_ms" in cols else {}
        ax.bar(xs, ys, width=width * 0.95, color=f"C{j % 10}", label=str(strat), **kw)
    ax.set_xticks(range(len(batches)))
    ax.set_xticklabels([str(b) for b in batches])
    ax.set_xlabel("batch size")
    ax.set_ylabel(unit + (" (whisker: p95)" if "p95_ms" in cols else ""))
    ax.set_title(f"{unit} by strategy", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return fig
