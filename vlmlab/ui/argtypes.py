"""argparse value types shared by the two argument-parsing skins (the CLI and the magics)."""
from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def image_size(text: str) -> tuple[int, int]:
    """``WxH`` in pixels, e.g. ``448x448``."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels, e.g. 448x448, got {text!r}") from None
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"expected positive WIDTHxHEIGHT, got {text!r}")
    return (w, h)


def path_as_typed(text: str) -> str:
    """An image path for a magic, which takes its arguments as typed: one that looks like part of an
    unexpanded Python expression is refused (``{DIR / "a.png"}`` splits into ``{DIR``, ``/`` and
    ``a.png}``, and the ``/`` alone would have the whole filesystem scanned)."""
    import os

    if text.startswith(("{", "$")) or text.endswith("}"):
        if not os.path.exists(text):
            raise argparse.ArgumentTypeError(
                f"{text!r} looks like part of a Python expression, and %vlm takes its arguments as typed "
                "({braces} and $names are not evaluated). Give the path itself, or call the API function "
                "(vlmlab.caption(...) and so on) from Python with the expression")
    return text
