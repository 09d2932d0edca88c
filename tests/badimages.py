"""Build folders of awkward image files for tests.

    from tests.badimages import make_valid_zoo, make_broken_zoo

``make_valid_zoo(folder)`` writes unusual but valid images and returns
``{filename: None}``; :data:`VALID_SIZES` gives each one's expected RGB size
(after EXIF rotation). ``make_broken_zoo(folder)`` writes broken files and
returns ``{filename: expected ImageError.kind}``.

``collect(folder)`` lists every name of both dicts except those in
:data:`EXPLICIT_ONLY` (a missing file and a folder named like an image), which
only exist as explicit paths: ``collect([folder / name for name in zoo])``.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

#: Broken entries a folder scan cannot list; pass them as explicit paths.
EXPLICIT_ONLY = frozenset({"missing.jpg", "folder.jpg"})

#: Expected (width, height) of each valid image once opened.
VALID_SIZES = {
    "gray.png": (32, 24), "bilevel.png": (32, 24), "bilevel.tif": (32, 24),
    "cmyk.jpg": (32, 24), "gray16.png": (32, 24), "int32.tif": (32, 24),
    "float32.tif": (32, 24), "palette_transparent.png": (32, 24),
    "palette.gif": (32, 24), "rgba.png": (32, 24), "la.png": (32, 24),
    "rgb_trns.png": (32, 24), "rgba_lossless.webp": (32, 24),
    "animated.gif": (32, 24), "animated.webp": (32, 24),
    "exif_rotated.jpg": (24, 32), "one_pixel.png": (1, 1),
    "wide.png": (4000, 2), "tall.bmp": (2, 4000), "png_named.jpg": (32, 24),
    "UPPER_CASE.JPEG": (32, 24), "rgb.ppm": (32, 24), "gray.pgm": (32, 24),
    "rgb.tiff": (32, 24), "nested/deeper/inner.png": (32, 24),
}


def _gradient(w: int = 32, h: int = 24, top: float = 255) -> np.ndarray:
    """A horizontal ramp 0..top, shape (h, w)."""
    return np.tile(np.linspace(0, top, w), (h, 1))


def _rgb(w: int = 32, h: int = 24) -> Image.Image:
    g = _gradient(w, h).astype(np.uint8)
    return Image.fromarray(np.dstack([g, g[::-1], np.full_like(g, 128)]))


def _half_transparent(mode: str) -> Image.Image:
    """Left half fully transparent (so it must come out white), right half opaque."""
    im = _rgb().convert(mode)
    alpha = np.full((24, 32), 255, np.uint8)
    alpha[:, :16] = 0
    im.putalpha(Image.fromarray(alpha))
    return im


def _png_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
            + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b""))


def _png_with_junk_idat() -> bytes:
    """Valid signature, IHDR and CRCs, but the compressed pixel data is noise."""
    data = _png_bytes(_rgb())
    i = data.index(b"IDAT")
    n = struct.unpack(">I", data[i - 4:i])[0]
    junk = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes()
    return data[:i - 4] + _chunk(b"IDAT", junk) + data[i + 8 + n:]


def _png_with_bad_ihdr_crc() -> bytes:
    data = bytearray(_png_bytes(_rgb()))
    data[29] ^= 0xFF  # last byte of the IHDR CRC
    return bytes(data)


def _encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def make_valid_zoo(folder: str | os.PathLike) -> dict[str, None]:
    """Write unusual-but-valid images into ``folder``; return ``{name: None}``."""
    d = Path(folder)
    (d / "nested/deeper").mkdir(parents=True, exist_ok=True)
    g8 = _gradient().astype(np.uint8)
    Image.fromarray(g8).save(d / "gray.png")                                # L
    Image.fromarray(g8 > 127).save(d / "bilevel.png")                       # 1
    Image.fromarray(g8 > 127).save(d / "bilevel.tif")                       # 1, TIFF
    _rgb().convert("CMYK").save(d / "cmyk.jpg")                             # CMYK JPEG
    Image.fromarray(_gradient(top=65535).astype(np.uint16)).save(d / "gray16.png")  # I;16
    Image.fromarray(_gradient(top=70000).astype(np.int32)).save(d / "int32.tif")    # I
    Image.fromarray(_gradient(top=1.0).astype(np.float32)).save(d / "float32.tif")  # F
    pal = _rgb().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.save(d / "palette_transparent.png", transparency=0)                 # P + tRNS
    pal.save(d / "palette.gif")                                             # P, GIF
    _half_transparent("RGB").save(d / "rgba.png")                           # RGBA
    _half_transparent("L").save(d / "la.png")                               # LA
    _rgb().save(d / "rgb_trns.png", transparency=(0, 255, 128))             # RGB + tRNS
    _half_transparent("RGB").save(d / "rgba_lossless.webp", lossless=True)  # RGBA WebP
    frames = [_rgb(), _rgb().transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:], duration=50)
    frames[0].save(d / "animated.webp", save_all=True, append_images=frames[1:], duration=50)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    _rgb().save(d / "exif_rotated.jpg", exif=exif)                          # stored 32x24
    Image.new("RGB", (1, 1), (10, 20, 30)).save(d / "one_pixel.png")
    _rgb(4000, 2).save(d / "wide.png")
    _rgb(2, 4000).save(d / "tall.bmp")
    (d / "png_named.jpg").write_bytes(_png_bytes(_rgb()))                   # PNG named .jpg
    _rgb().save(d / "UPPER_CASE.JPEG", "JPEG")
    _rgb().save(d / "rgb.ppm")
    Image.fromarray(g8).save(d / "gray.pgm")
    _rgb().save(d / "rgb.tiff")
    _rgb().save(d / "nested/deeper/inner.png")
    return {name: None for name in VALID_SIZES}


def make_broken_zoo(folder: str | os.PathLike, *, fifo: bool = False) -> dict[str, str]:
    """Write broken files into ``folder``; return ``{name: expected kind}``.

    ``unreadable.png`` is only made when not running as root (root reads
    anything). ``fifo=True`` adds a named pipe, which ``shutil.copytree`` and
    naive readers would block on, so it is off by default.
    """
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    jpeg, png = _encoded(_rgb(), "JPEG"), _png_bytes(_rgb())
    gif, webp = _encoded(_rgb(), "GIF"), _encoded(_rgb(), "WEBP")
    files = {
        "empty.png": (b"", "empty"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "truncated.png": (png[: len(png) // 2], "truncated"),
        "truncated_header.png": (png[:30], "truncated"),
        "truncated.gif": (gif[: len(gif) // 2], "truncated"),
        "truncated.webp": (webp[: len(webp) // 2], "truncated"),
        "text.png": (b"just some notes, not pixels\n", "not_an_image"),
        "error_page.jpg": (b"<!DOCTYPE html><html><body>403 Forbidden</body></html>",
                           "not_an_image"),
        "bomb.png": (_png_claiming(100_000, 100_000), "too_large"),
        "corrupt_data.png": (_png_with_junk_idat(), "corrupt"),
        "corrupt_header.png": (_png_with_bad_ihdr_crc(), "corrupt"),
        "photo_heic.jpg": (b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 64, "unsupported"),
        "figure_eps.png": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"
                           b"newpath 0 0 moveto 8 8 lineto stroke\nshowpage\n", "unsupported"),
        "drawing_svg.png": (b'<svg xmlns="http://www.w3.org/2000/svg" width="8" '
                            b'height="8"><rect width="8" height="8"/></svg>', "unsupported"),
    }
    kinds = {}
    for name, (data, kind) in files.items():
        (d / name).write_bytes(data)
        kinds[name] = kind
    os.symlink(d / "gone.jpg", d / "broken_symlink.jpg")
    kinds["broken_symlink.jpg"] = "broken_symlink"
    (d / "folder.jpg").mkdir()
    kinds["folder.jpg"] = "is_a_directory"
    kinds["missing.jpg"] = "not_found"
    if os.geteuid() != 0:
        (d / "unreadable.png").write_bytes(png)
        os.chmod(d / "unreadable.png", 0)
        kinds["unreadable.png"] = "unreadable"
    if fifo:
        os.mkfifo(d / "pipe.png")
        kinds["pipe.png"] = "not_a_file"
    return kinds
