"""Why an image cannot be used: :class:`ImageError` and its kinds, named from the OS error or from
what Pillow raised and the file's own bytes. Messages describe a file's content, never quote it (a
"photo" may be a key or a password file)."""
from __future__ import annotations

import errno
import os
import re
from typing import Any

from PIL import UnidentifiedImageError

#: Every ``ImageError.kind``, with what it means.
ERROR_KINDS = {
    "not_found": "the path does not exist (or is too long to exist)",
    "broken_symlink": "the path is a symbolic link whose target does not exist, or a link loop",
    "is_a_url": "a URL: vlmlab reads local files only",
    "closed": "a PIL image that was closed before it was captioned",
    "is_a_directory": "the path is a folder, not a file",
    "not_a_file": "the path is a FIFO, socket or device, not a regular file",
    "unreadable": "the file exists but cannot be read (permissions, I/O error)",
    "empty": "the file has 0 bytes",
    "not_an_image": "the content is not an image format (text, HTML, ...)",
    "unsupported": "an image format or pixel mode this Pillow cannot decode",
    "truncated": "the image data ends before the image is complete",
    "corrupt": "the header is recognised but the data inside is damaged",
    "too_large": "width x height exceeds max_pixels (decompression-bomb guard)",
}


class ImageError(Exception):
    """An image that cannot be used. ``kind`` is a key of :data:`ERROR_KINDS`;
    ``message`` names the item and says what was wrong and what to do."""

    def __init__(self, key: str, kind: str, message: str):
        super().__init__(key, kind, message)  # args kept whole so it pickles
        self.key, self.kind, self.message = key, kind, message

    def __str__(self) -> str:
        return self.message


def os_error(key: str, e: OSError) -> ImageError:
    if e.errno == errno.ENAMETOOLONG:
        return ImageError(key, "not_found", f"{key}: the path is too long for the file system (a name over "
                          "255 bytes or a path over 4096), so no such file can exist. Check how it was built.")
    if isinstance(e, FileNotFoundError):
        return ImageError(key, "not_found", f"{key}: no such file. Check the path "
                          "(relative paths are resolved from the current folder, "
                          f"{os.getcwd()!r}).")
    if isinstance(e, IsADirectoryError):
        return ImageError(key, "is_a_directory", f"{key}: is a folder, not an image file.")
    if isinstance(e, PermissionError):
        return ImageError(key, "unreadable", f"{key}: permission denied. Make the "
                          "file readable for this user (e.g. chmod a+r).")
    return ImageError(key, "unreadable", f"{key}: cannot be read ({e.strerror or e}). "
                      "Check the disk or network share it lives on.")


# Formats Pillow cannot identify: (signature test, what it is, what to do).
_FOREIGN = [
    (lambda h: h[4:8] == b"ftyp" and h[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"hevc"),
     "a HEIC/HEIF photo", "install pillow-heif and call "
     "pillow_heif.register_heif_opener(), or convert it to JPEG/PNG"),
    (lambda h: h[4:8] == b"ftyp" and h[8:12] in (b"avif", b"avis"),
     "an AVIF image", "use a Pillow built with AVIF support, or convert it to JPEG/PNG"),
    (lambda h: h.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL ")),
     "a JPEG XL image", "convert it to JPEG/PNG"),
    (lambda h: b"<svg" in h[:512].lower(),
     "an SVG vector drawing", "rasterise it first (e.g. with cairosvg or a browser)"),
    (lambda h: h.startswith(b"%PDF"), "a PDF document", "render its pages to PNG first"),
    (lambda h: h.startswith((b"%!PS", b"\xc5\xd0\xd3\xc6")), "a PostScript/EPS file",
     "rasterise it first (Ghostscript is not run on input files)"),
]
# Formats Pillow reads: (name, signature test, "does the file end early?"), the
# last from an end marker or a declared length where the format has one.
_KNOWN = [
    ("PNG", lambda h: h.startswith(b"\x89PNG\r\n\x1a\n"), lambda h, t, n: b"IEND" not in t),
    ("JPEG", lambda h: h.startswith(b"\xff\xd8\xff"), lambda h, t, n: b"\xff\xd9" not in t),
    ("GIF", lambda h: h.startswith(b"GIF8"), lambda h, t, n: not t.endswith(b";")),
    ("WebP", lambda h: h[:4] == b"RIFF" and h[8:12] == b"WEBP",
     lambda h, t, n: int.from_bytes(h[4:8], "little") + 8 > n),
    ("BMP", lambda h: h.startswith(b"BM"), lambda h, t, n: False),
    ("TIFF", lambda h: h.startswith((b"II*\x00", b"MM\x00*")), lambda h, t, n: False),
    ("PNM", lambda h: re.match(rb"P[1-7]\s", h) is not None, lambda h, t, n: False),
]


def classify(key: str, src: Any, e: Exception) -> ImageError:
    """Name what went wrong when Pillow failed, from the error and the bytes."""
    head, tail, size = _peek(src)
    text = str(e).lower()
    unidentified = isinstance(e, UnidentifiedImageError)
    why = "" if unidentified else f" ({type(e).__name__}: {e})"
    for test, what, advice in _FOREIGN if unidentified else []:
        if test(head):
            return ImageError(key, "unsupported", f"{key}: is {what}, which this Pillow "
                              f"cannot decode; {advice}.")
    if "closed image" in text:
        return ImageError(key, "closed", f"{key}: this PIL image was closed (im.close() or a finished "
                          "'with Image.open(...)' block) before it was captioned. Pass it while it is open, "
                          "or pass im.copy().")
    if "not available" in text or "unsupported" in text or "not supported" in text:
        return ImageError(key, "unsupported", f"{key}: uses a format or feature this "
                          f"Pillow cannot decode{why}. Convert it to PNG or JPEG.")
    fmt, ends_early = next(((n, end) for n, is_it, end in _KNOWN if is_it(head)),
                           (None, None))
    looks = f"looks like a {fmt} file, but " if fmt else ""
    if "truncated" in text or isinstance(e, EOFError) or (
            ends_early and ends_early(head, tail, size)):
        after = f", after {size:,} bytes" if size else ""
        return ImageError(key, "truncated", f"{key}: {looks}the image data ends early"
                          f"{after}{why}. The file was cut off (e.g. an "
                          "interrupted download or copy); fetch or export it again.")
    if unidentified and not fmt:
        return ImageError(key, "not_an_image", f"{key}: is not an image; it is "
                          f"{_describe_bytes(head)}. Check that the right file was saved.")
    damaged = "its header cannot be parsed" if unidentified else "the image data is damaged"
    return ImageError(key, "corrupt", f"{key}: {looks}{damaged}{why}. Re-export or "
                      "fetch it again; an image editor may be able to recover it.")


def _peek(src: Any) -> tuple[bytes, bytes, int]:
    """First and last 1 KiB and the size of a file object; empty for PIL images."""
    if not hasattr(src, "seek"):
        return b"", b"", 0
    try:
        size = src.seek(0, os.SEEK_END)
        src.seek(0)
        head = src.read(1024)
        src.seek(max(0, size - 1024))
        return head, src.read(1024), size
    except Exception:
        return b"", b"", 0


def _describe_bytes(head: bytes) -> str:
    """What the content is, never the content itself (it may be a key or a password file)."""
    start = head[:200].lstrip().lower()
    if start.startswith((b"<!doctype html", b"<html")):
        return "an HTML page (often an error page saved instead of the image)"
    if start.startswith(b"-----begin"):
        return "text: a PEM block (a key or a certificate)"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return f"binary data of an unknown format (first bytes {head[:4].hex(' ')})"
    if start.startswith((b"{", b"[")):
        return "text that looks like JSON"
    if start.startswith(b"<"):
        return "text that looks like XML or markup"
    return "plain text"
