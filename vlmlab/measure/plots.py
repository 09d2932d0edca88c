"""Pictures that compare runs: ``BenchResult.plot()`` draws one bar per strategy and batch size."""
from __future__ import annotations

from vlmlab.figures import GiB, frame, new_figure


def strategy_comparison(df, metric="images_per_s", ax=None, figsize=(7, 3.5)):
    """Grouped bars: one group per batch size, one bar per strategy, height ``metric`` (a column:
    images_per_s, p50_ms, p95_ms, a peak column in bytes — shown in GiB ...). With
    ``metric="p50_ms"`` and a p95_ms column, a whisker reaches up to p95. Rows repeated for one
    (strategy, batch size) are averaged."""
    fig, ax = new_figure(ax, figsize)
    df = frame(df)
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
