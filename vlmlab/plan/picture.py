"""The plan picture: one stacked bar per device (weights by role, KV cache, activations, context,
free) against the card's capacity. ``Plan.picture()`` and ``Plan.save_picture()`` draw it."""
from __future__ import annotations

from vlmlab.figures import GiB, new_figure

PICTURE = [  # (label, components, colour)
    ("vision", ("vision",), "#4c72b0"), ("projector", ("projector",), "#8172b3"),
    ("embeddings", ("embeddings", "other"), "#64b5cd"), ("layers", ("layers", "norm"), "#55a868"),
    ("head", ("head",), "#937860"), ("KV cache", ("kv_cache",), "#dd8452"),
    ("activations", ("activations", "logits"), "#c44e52"), ("context", ("context",), "#8c8c8c"),
]


def plan_bars(plan, ax=None, figsize=(7, 4)):
    """One stacked bar per device: weights by role, KV cache, activations, context, free; a capacity line."""
    fig, ax = new_figure(ax, figsize)
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
