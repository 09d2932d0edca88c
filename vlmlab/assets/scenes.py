"""Synthetic scenes of coloured shapes with deterministic reference captions.

Each scene is one group of 1-3 identical shapes (same kind and colour, sizes
vary a little) placed in one horizontal third of the image, drawn anti-aliased
over a pale background that is either a plain colour, a linear gradient
between two pale colours, or a pale colour with light pixel noise.

Caption grammar (always exactly six words, lower case, no punctuation)::

    caption  := COUNT " " COLOUR " " NOUN " " PLACE
    COUNT    := "a" | "two" | "three"
    COLOUR   := "red" | "green" | "blue" | "yellow" | "purple" | "black"
    NOUN     := KIND          (COUNT == "a")
              | KIND + "s"    (circles, squares, triangles)
              | "crosses"     (plural of cross)
    KIND     := "circle" | "square" | "triangle" | "cross"
    PLACE    := "on the left" | "in the center" | "on the right"

e.g. ``"a red circle on the left"``, ``"three blue crosses in the center"``.

Everything is driven by the ``numpy.random.Generator`` passed in, so the same
seed always gives the same images and captions.  Only numpy and Pillow are
used (no torch).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 30, 30),
    "green": (20, 150, 40),
    "blue": (30, 70, 230),
    "yellow": (235, 200, 0),
    "purple": (140, 40, 180),
    "black": (20, 20, 20),
}
POSITIONS = ("left", "center", "right")
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
PLACE_PHRASES = {"left": "on the left", "center": "in the center", "right": "on the right"}
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
BACKGROUNDS = ("plain", "gradient", "noise")
SAMPLES_SEED = 20261173  # seed of the 8 shipped images in vlmlab/samples/ (picked to show every kind, colour, count, place)

_SUPERSAMPLE = 4


def caption_for(objects: list[dict]) -> str:
    """Reference caption for a list of objects of one kind, colour and position."""
    kind, colour, position = (objects[0][k] for k in ("kind", "colour", "position"))
    assert all((o["kind"], o["colour"], o["position"]) == (kind, colour, position) for o in objects)
    noun = kind if len(objects) == 1 else PLURALS[kind]
    return f"{COUNT_WORDS[len(objects)]} {colour} {noun} {PLACE_PHRASES[position]}"


_CAPTION_RE = re.compile(
    r"^(?P<count>a|two|three) (?P<colour>%s) (?P<noun>[a-z]+) (?P<place>on the left|in the center|on the right)$"
    % "|".join(COLOURS)
)


def parse_caption(caption: str) -> dict | None:
    """Inverse of :func:`caption_for`: ``{"count", "colour", "kind", "position"}`` or None if off-grammar."""
    m = _CAPTION_RE.match(caption.strip())
    if not m:
        return None
    count = {w: n for n, w in COUNT_WORDS.items()}[m["count"]]
    nouns = {kind: kind for kind in KINDS} if count == 1 else {PLURALS[kind]: kind for kind in KINDS}
    if m["noun"] not in nouns:
        return None
    position = {p: k for k, p in PLACE_PHRASES.items()}[m["place"]]
    return {"count": count, "colour": m["colour"], "kind": nouns[m["noun"]], "position": position}


def _pale(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(185, 255, size=3)


def make_background(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    """A pale ``size x size x 3`` float background of the given kind (see ``BACKGROUNDS``)."""
    if kind == "plain":
        return np.broadcast_to(_pale(rng), (size, size, 3)).astype(np.float64)
    if kind == "gradient":
        a, b = _pale(rng), _pale(rng)
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
        t = (np.cos(angle) * xx + np.sin(angle) * yy)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
        return a + (b - a) * t[..., None]
    if kind == "noise":
        base = np.clip(_pale(rng), 195, 245)
        return base + rng.normal(0, rng.uniform(6, 12), size=(size, size, 3))
    raise ValueError(f"unknown background kind {kind!r}")


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float) -> None:
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif kind == "square":
        h = 0.85 * r
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=255)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx + 0.95 * r, cy + 0.75 * r), (cx - 0.95 * r, cy + 0.75 * r)], fill=255)
    elif kind == "cross":
        w = 0.36 * r
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=255)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=255)
    else:
        raise ValueError(f"unknown shape kind {kind!r}")


def _place(rng: np.random.Generator, size: int, position: str, count: int) -> list[tuple[float, float, float]]:
    """Non-overlapping (cx, cy, r) circles inside one horizontal third of the image."""
    third = size / 3
    x0 = POSITIONS.index(position) * third
    while True:
        placed: list[tuple[float, float, float]] = []
        for _ in range(200):
            r = rng.uniform(0.075, 0.11) * size
            cx = rng.uniform(x0 + r + 1, x0 + third - r - 1)
            cy = rng.uniform(r + 1, size - r - 1)
            if all((cx - px) ** 2 + (cy - py) ** 2 > (r + pr + 2) ** 2 for px, py, pr in placed):
                placed.append((cx, cy, r))
                if len(placed) == count:
                    return placed


def make_scene(rng: np.random.Generator, size: int = 64) -> tuple[Image.Image, str, list[dict]]:
    """One random scene: ``(RGB image, reference caption, objects)``.

    Each object is a dict with ``kind``, ``colour``, ``position`` (left/center/right)
    and its pixel geometry ``x``, ``y`` (centre) and ``r`` (radius).
    """
    kind = KINDS[rng.integers(len(KINDS))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    position = POSITIONS[rng.integers(len(POSITIONS))]
    count = int(rng.integers(1, 4))
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]

    pixels = make_background(rng, size, background)
    mask = Image.new("L", (size * _SUPERSAMPLE,) * 2, 0)
    draw = ImageDraw.Draw(mask)
    objects = []
    for cx, cy, r in _place(rng, size, position, count):
        s = _SUPERSAMPLE
        _draw_shape(draw, kind, cx * s, cy * s, r * s)
        objects.append({"kind": kind, "colour": colour, "position": position,
                        "x": round(cx, 2), "y": round(cy, 2), "r": round(r, 2)})
    alpha = np.asarray(mask.resize((size, size), Image.BOX), dtype=np.float64)[..., None] / 255.0
    pixels = pixels * (1 - alpha) + np.array(COLOURS[colour], dtype=np.float64) * alpha
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    return image, caption_for(objects), objects


def make_dataset(n: int, seed: int, size: int = 64) -> list[tuple[Image.Image, str, list[dict]]]:
    """``n`` scenes from ``numpy.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    return [make_scene(rng, size) for _ in range(n)]


def save_samples(folder, n: int = 8, seed: int = SAMPLES_SEED, size: int = 64) -> dict[str, str]:
    """Write ``n`` scenes as ``sample_XX.png`` plus ``captions.json`` into ``folder``.

    Returns the ``{file name: reference caption}`` mapping that is also written to ``captions.json``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    captions = {}
    for i, (image, caption, _) in enumerate(make_dataset(n, seed, size)):
        name = f"sample_{i:02d}.png"
        image.save(folder / name)
        captions[name] = caption
    (folder / "captions.json").write_text(json.dumps(captions, indent=2) + "\n")
    return captions
