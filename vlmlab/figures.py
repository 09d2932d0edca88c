"""Figures without pyplot: each picture function returns a matplotlib Figure built directly, so a
notebook shows it once (as the cell's value) and scripts can ``savefig`` it; no global state.
Shared by the plan picture, the profile plots and the bench plots."""
from __future__ import annotations

import base64
import io

GiB = 1024**3


def new_figure(ax=None, figsize=(7, 4)):
    """``(fig, ax)``: the given axes' figure, or a new Figure with one subplot."""
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def png_bytes(fig, dpi: int = 80) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def png_html(fig, dpi: int = 80) -> str:
    """A Figure as an inline ``<img>`` for ``_repr_html_``."""
    return f"<img src='data:image/png;base64,{base64.b64encode(png_bytes(fig, dpi)).decode()}'/>"


def frame(data):
    """A DataFrame from a DataFrame or an iterable of row dicts."""
    import pandas as pd

    return data if isinstance(data, pd.DataFrame) else pd.DataFrame(list(data))
