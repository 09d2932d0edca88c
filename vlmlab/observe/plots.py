"""Pictures of one profiled run: memory over time per device, latency per stage and device."""
from __future__ import annotations

from vlmlab.figures import GiB, frame, new_figure


def device_name(d):
    return f"GPU{d}" if isinstance(d, int) else str(d)


def memory_timeline(samples_df, ax=None, figsize=(7, 3.5), predicted=None):
    """Memory over time, one colour per device: allocated solid, reserved dashed (CUDA); the process
    RSS solid for "cpu". ``samples_df``: MemorySampler rows (DataFrame or list of dicts: t, device,
    allocated, reserved, rss). ``predicted``: optional {device: bytes}, drawn dotted."""
    fig, ax = new_figure(ax, figsize)
    df = frame(samples_df)
    if df.empty or "device" not in df:
        ax.text(0.5, 0.5, "no memory samples", ha="center", va="center", transform=ax.transAxes)
        return fig
    predicted = predicted or {}
    devices = list(dict.fromkeys(df["device"].tolist()))
    for i, dev in enumerate(devices):
        g = df[df["device"].map(lambda d: d == dev)].sort_values("t")
        colour, name = f"C{i % 10}", device_name(dev)
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
    fig, ax = new_figure(ax, figsize)
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
        ax.bar(stages, values, bottom=bottoms, color=f"C{i % 10}", width=0.6, label=device_name(dev))
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
