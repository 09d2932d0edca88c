"""``CaptionResult``: what ``vlmlab.caption()`` returns.

One row (a dict) per input image, in input order, with at least::

    image       the image key (path, "pil:3", "dataset:7", ...)
    caption     the generated text, or None when the row has an error
    error       None, or the specific message (what was wrong, what to do)
    error_kind  None, an ``images.ERROR_KINDS`` key, "oom" or "failed"
    n_tokens    tokens in the caption (end-of-sequence and padding not counted)
    latency_ms  the image's share of its generation call's wall time
    batch_size  how many images that generation call held (smaller after an OOM)
    device      where the inputs went ("cpu", "cuda:0", "cuda:0,cuda:1" for a split)
    replica     which replica of the plan made it (0 in this process; one per worker process)

It renders in a notebook as a thumbnail gallery (``_repr_html_``); ``to_pandas()`` gives the table.
"""
from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field

COLUMNS = ("image", "caption", "error", "error_kind", "n_tokens", "latency_ms", "batch_size", "device", "replica")
THUMB_PX = 96  # longest side of a gallery thumbnail
GALLERY_MAX = 48  # tiles shown before "... and N more"


@dataclass
class CaptionResult:
    rows: list[dict]
    model: str | None = None
    prompt: str | None = None  # the text the user asked (family default if not given)
    prompt_text: str | None = None  # the full templated prompt the model saw
    out: str | None = None  # the journal file, if any
    resumed: int = 0  # rows read back from the journal instead of generated
    oom_retries: int = 0  # how many times a batch was halved after running out of memory
    elapsed_s: float = 0.0
    profile: object = None  # vlmlab.observe result when caption(profile=True)
    warnings: list = field(default_factory=list)  # workers that died or stopped answering, one line each
    items: dict = field(default_factory=dict, repr=False)  # key -> ImageItem, to draw thumbnails

    # ---- plain data ----------------------------------------------------------------------------
    def __len__(self):
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    @property
    def captions(self) -> dict[str, str]:
        """``{image key: caption}`` for the images that were captioned."""
        return {r["image"]: r["caption"] for r in self.rows if not r.get("error")}

    @property
    def errors(self) -> dict[str, str]:
        """``{image key: error message}`` for the inputs that could not be captioned."""
        return {r["image"]: r["error"] for r in self.rows if r.get("error")}

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_pandas(self):
        import pandas as pd

        extra = [c for r in self.rows for c in r if c not in COLUMNS]
        cols = list(COLUMNS) + list(dict.fromkeys(extra))
        return pd.DataFrame(self.rows, columns=cols)

    def to_json(self, path=None, indent=None) -> str:
        """The rows as a JSON list (written to ``path`` too when given)."""
        text = json.dumps(self.rows, indent=indent, ensure_ascii=False, default=str)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return text

    # ---- display -------------------------------------------------------------------------------
    def summary(self) -> str:
        n_err = len(self.errors)
        parts = [f"{len(self.rows)} image(s): {len(self.rows) - n_err} captioned, {n_err} error(s)"]
        if self.resumed:
            parts.append(f"{self.resumed} from the journal")
        if self.oom_retries:
            parts.append(f"{self.oom_retries} OOM retr{'y' if self.oom_retries == 1 else 'ies'} at smaller batches")
        if self.elapsed_s:
            parts.append(f"{self.elapsed_s:.1f} s")
        parts += [w.splitlines()[0] for w in self.warnings]
        return "; ".join(parts)

    def __repr__(self):
        return f"CaptionResult({self.model}, {self.summary()})"

    def _repr_html_(self):
        esc = html.escape
        tiles = [self._tile(r) for r in self.rows[:GALLERY_MAX]]
        more = len(self.rows) - GALLERY_MAX
        if more > 0:
            tiles.append(f"<div style='width:{THUMB_PX}px;align-self:center;color:#666'>… and {more} more "
                         f"(<code>to_pandas()</code>)</div>")
        where = f" → <code>{esc(str(self.out))}</code>" if self.out else ""
        return (f"<div class='vlmlab-captions'><b>{esc(str(self.model))}</b> — {esc(self.summary())}{where}"
                f"<div style='display:flex;flex-wrap:wrap;gap:6px;margin-top:4px'>{''.join(tiles)}</div></div>")

    def _tile(self, row) -> str:
        esc = html.escape
        name = row["image"].replace("\\", "/").rsplit("/", 1)[-1]
        style = f"width:{THUMB_PX + 8}px;font-size:11px;line-height:1.2;overflow-wrap:anywhere"
        if row.get("error"):
            return (f"<div style='{style}' title='{esc(row['error'], quote=True)}'>"
                    f"<div style='width:{THUMB_PX}px;height:{THUMB_PX}px;background:#fbe9e9;border:1px solid #c44e52;"
                    f"color:#c44e52;display:flex;align-items:center;justify-content:center;text-align:center'>"
                    f"{esc(row.get('error_kind') or 'error')}</div>"
                    f"<div><code>{esc(name)}</code></div><div style='color:#c44e52'>{esc(_short(row['error'].removeprefix(row['image'] + ': ')))}</div></div>")
        img = self._thumb(row["image"])
        pic = (f"<img src='data:image/jpeg;base64,{img}' style='max-width:{THUMB_PX}px;max-height:{THUMB_PX}px'/>"
               if img else f"<div style='width:{THUMB_PX}px;height:{THUMB_PX}px;background:#eee'></div>")
        return (f"<div style='{style}'>{pic}<div><code>{esc(name)}</code></div>"
                f"<div>{esc(row.get('caption') or '')}</div></div>")

    def _thumb(self, key) -> str | None:
        item = self.items.get(key)
        if item is None:
            return None
        from vlmlab.run.images import ImageError, open_image

        try:
            im = open_image(item)
        except ImageError:
            return None
        im.thumbnail((THUMB_PX, THUMB_PX))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=70)
        return base64.b64encode(buf.getvalue()).decode()


def _short(text: str, n: int = 90) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
