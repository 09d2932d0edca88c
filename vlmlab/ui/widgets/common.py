"""Small helpers shared by the dashboard's panels: figures as PNG bytes, messages as HTML."""
from __future__ import annotations

import html
import io


def png(fig, dpi: int = 80) -> bytes:
    """A matplotlib Figure as PNG bytes, for an ``ipywidgets.Image``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def notes(problems=(), warnings=(), error: str | None = None) -> str:
    """Problems and errors in red, warnings in grey, as an HTML list ('' when there is nothing)."""
    items = [f"<li style='color:#c44e52;white-space:pre-wrap'>{html.escape(str(error))}</li>"] if error else []
    items += [f"<li class='vlmlab-problem' style='color:#c44e52'>{html.escape(p)}</li>" for p in problems]
    items += [f"<li class='vlmlab-warning' style='color:#555'>{html.escape(w)}</li>" for w in warnings]
    return f"<ul style='margin:0.2em 0'>{''.join(items)}</ul>" if items else ""


def message(text: str, colour: str = "#555") -> str:
    return f"<span style='color:{colour}'>{html.escape(text)}</span>" if text else ""


def close_tree(widget) -> None:
    """Close a widget and every widget below it (ipywidgets' close() is not recursive)."""
    for child in getattr(widget, "children", ()) or ():
        close_tree(child)
    widget.close()
