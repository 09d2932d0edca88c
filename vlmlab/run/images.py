"""Image input for captioning: gather images, open them robustly.

``collect(images)`` turns whatever the user passed (a file, a folder, a list, PIL
images, a ``datasets.Dataset``) into a deterministic list of :class:`ImageItem`.
It never opens files: a missing or broken file is still an item, and its problem
is reported when that item is opened, so one bad file costs one row, not the run.

``open_image(item)`` returns an RGB ``PIL.Image.Image`` or raises
:class:`ImageError` whose ``kind`` is one of :data:`ERROR_KINDS`. Unusual but
valid images (grayscale, 1-bit, CMYK, 16-bit, float, palette, alpha, animated,
EXIF-rotated, a PNG named .jpg, ...) are converted, not rejected. Pillow's
global settings (``MAX_IMAGE_PIXELS``, ``LOAD_TRUNCATED_IMAGES``, warning
filters) are never changed.
"""

from __future__ import annotations

import errno
import io
import os
import re
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps

from vlmlab.run.image_errors import ERROR_KINDS, ImageError, classify, os_error  # noqa: F401  ERROR_KINDS re-exported


def _readable_extensions() -> frozenset:
    """The file extensions of every format this Pillow can decode (AVIF, ICO, PSD, TGA, ... when it
    has them), except EPS (decoded by running Ghostscript) and stub formats that cannot decode."""
    Image.init()
    found = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
    for ext, fmt in Image.registered_extensions().items():
        factory = Image.OPEN.get(fmt, (None,))[0]
        if fmt != "EPS" and isinstance(factory, type) and not issubclass(factory, ImageFile.StubImageFile):
            found.add(ext.lower())
    return frozenset(found)


IMAGE_EXTENSIONS = _readable_extensions()
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
#: Pillow's own default limit (``PIL.Image.MAX_IMAGE_PIXELS``).
DEFAULT_MAX_PIXELS = 89_478_485

@dataclass(frozen=True)
class DatasetRow:
    """Lazy reference to ``dataset[index][column]``; decoded only when opened."""

    dataset: Any = field(repr=False, compare=False)
    column: str | None
    index: int

    def get(self) -> Any:
        row = self.dataset[self.index]
        return row if self.column is None else row[self.column]


@dataclass(frozen=True)
class UnsearchedFolder:
    """A folder a scan could not list (permissions, I/O): it becomes an error row, not a silent gap."""

    path: str
    reason: str


@dataclass(frozen=True)
class ImageItem:
    """One input image. ``key`` is stable and unique within a ``collect()``
    result: the path for files (``"<path>#2"`` etc. for repeats of a path),
    ``"pil:<i>"`` / ``"dataset:<i>"`` for in-memory images. Items compare by
    ``key`` only. ``source`` is a ``Path``, a PIL image or a :class:`DatasetRow`."""

    key: str
    source: Any = field(compare=False)


# ----------------------------------------------------------------- collect

_ACCEPTED = ("collect() accepts a file or folder path (str or pathlib.Path), "
             "a PIL.Image.Image, a list/tuple of those, or a datasets.Dataset "
             "(with column=) or a Dataset column")


def collect(images: Any, column: str | None = None) -> list[ImageItem]:
    """Turn ``images`` into a deterministic list of :class:`ImageItem`.

    Accepts a path (``str`` / ``Path``) to a file or a folder (searched
    recursively for :data:`IMAGE_EXTENSIONS`, case-insensitive, hidden files
    and folders skipped, sorted), a ``PIL.Image.Image``, a list/tuple mixing
    those, or a ``datasets.Dataset`` (with ``column=``; defaults to ``"image"``
    or the only column) or one of its columns. Missing files become items too;
    their error is raised by :func:`open_image`.
    """
    if _is_dataset(images):
        return _collect_dataset(images, column)
    if column is not None:
        raise TypeError("column= is only meaningful with a datasets.Dataset; "
                        f"got {_type_name(images)}")
    if _is_dataset_column(images):
        return [ImageItem(f"dataset:{i}", DatasetRow(images, None, i))
                for i in range(len(images))]
    entries = images if isinstance(images, (list, tuple)) else [images]
    items: list[ImageItem] = []
    for i, entry in enumerate(entries):
        if isinstance(entry, Image.Image):
            items.append(ImageItem(f"pil:{i}", entry))
        elif isinstance(entry, str) and _URL.match(entry):
            items.append(ImageItem(entry, entry))  # kept whole: Path() would fold "https://" to "https:/"
        elif isinstance(entry, (str, os.PathLike)):
            if not os.fspath(entry).strip():
                raise ValueError("an empty path names no image (it would mean the current folder); "
                                 "pass '.' to caption the images in the current folder")
            items.extend(p if isinstance(p, ImageItem) else ImageItem(str(p), p) for p in _expand_path(Path(entry)))
        else:
            raise TypeError(_ACCEPTED + f"; got {_type_name(entry)}"
                            + (f" at position {i}" if entries is images else ""))
    return _dedupe_keys(items)


def _type_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}".removeprefix("builtins.")


def _expand_path(path: Path) -> list[Path]:
    """A folder becomes its images; anything else (even missing) stays itself. A folder named like
    an image ("x.jpg/") stays itself too: it was meant as a file, and becomes an is_a_directory row."""
    try:
        is_dir = path.is_dir()
    except OSError:  # e.g. a name too long, or inside an unreadable folder: open_image says which
        is_dir = False
    if not is_dir or path.suffix.lower() in IMAGE_EXTENSIONS:
        return [path]
    found, others, unsearched = [], [], []

    def cannot_list(err: OSError):
        where = err.filename or str(path)
        unsearched.append(ImageItem(str(where), UnsearchedFolder(str(where), err.strerror or str(err))))

    for root, dirs, files in os.walk(path, onerror=cannot_list):  # does not follow folder symlinks
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith("."):
                continue
            full = Path(root, name)
            (found if full.suffix.lower() in IMAGE_EXTENSIONS else others).append(full)
    if not found and not unsearched:
        seen = f"; it holds {len(others)} other file(s), e.g. {others[0].name!r}" if others else ""
        raise ValueError(
            f"No images found in folder {str(path)!r} (searched recursively for the "
            f"{len(IMAGE_EXTENSIONS)} extensions Pillow reads, such as .jpg .png .webp .avif; hidden files "
            f"are skipped){seen}. Check the path, or pass the files explicitly.")
    parts = {id(x): Path(x.key if isinstance(x, ImageItem) else x).relative_to(path).parts
             for x in found + unsearched}
    return sorted(found + unsearched, key=lambda x: parts[id(x)])


def _dedupe_keys(items: list[ImageItem]) -> list[ImageItem]:
    counts: dict[str, int] = {}
    out = []
    for item in items:
        n = counts[item.key] = counts.get(item.key, 0) + 1
        out.append(item if n == 1 else ImageItem(f"{item.key}#{n}", item.source))
    return out


def _is_dataset(obj: Any) -> bool:
    return (hasattr(obj, "column_names") and hasattr(obj, "__getitem__")
            and hasattr(obj, "__len__") and not isinstance(obj, (str, bytes)))


def _is_dataset_column(obj: Any) -> bool:
    """``datasets`` >= 4 returns a lazy ``Column`` for ``ds["image"]``."""
    return (hasattr(obj, "column_name") and hasattr(obj, "__getitem__")
            and hasattr(obj, "__len__"))


def _collect_dataset(ds: Any, column: str | None) -> list[ImageItem]:
    if isinstance(ds.column_names, dict):
        raise TypeError(f"This looks like a DatasetDict with splits {list(ds.column_names)}; "
                        "pass one split, e.g. collect(ds['train'], column='image').")
    names = list(ds.column_names)
    if column is None:
        if "image" in names:
            column = "image"
        elif len(names) == 1:
            column = names[0]
        else:
            raise ValueError(f"This dataset has columns {names}; say which holds "
                             "the images, e.g. collect(ds, column='img').")
    if column not in names:
        raise ValueError(f"Column {column!r} is not in the dataset; its columns are {names}.")
    if hasattr(ds, "select_columns"):  # read only the image column per row
        ds = ds.select_columns([column])
    ds = _without_decoding(ds, column)
    return [ImageItem(f"dataset:{i}", DatasetRow(ds, column, i)) for i in range(len(ds))]


def _without_decoding(ds: Any, column: str) -> Any:
    """Have a ``datasets`` Image column hand over raw bytes, so that
    :func:`open_image` decodes them with its size check and error kinds."""
    feature = getattr(ds, "features", {}).get(column)
    if type(feature).__name__ != "Image" or not getattr(feature, "decode", False):
        return ds
    try:
        return ds.cast_column(column, replace(feature, decode=False))
    except Exception:  # an older or unusual datasets: let it decode itself
        return ds


# -------------------------------------------------------------- open_image


def open_image(item: ImageItem, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Return ``item`` as an RGB image, or raise :class:`ImageError`.

    ``max_pixels`` bounds width x height, checked from the header before any
    pixel is decoded. Pillow's own bomb check still applies: raising
    ``max_pixels`` above twice ``PIL.Image.MAX_IMAGE_PIXELS`` needs that raised too.
    """
    source = item.source
    if isinstance(source, DatasetRow):
        try:
            source = source.get()
        except Exception as e:  # the dataset decodes images itself
            raise ImageError(item.key, "corrupt", f"{item.key}: the dataset could not "
                             f"decode this row ({type(e).__name__}: {e}).") from e
    if isinstance(source, dict):  # datasets Image(decode=False): {"bytes", "path"}
        source = source.get("bytes") or source.get("path")
    if source is None or (isinstance(source, (bytes, bytearray)) and not source):
        raise ImageError(item.key, "empty", f"{item.key}: holds no image data "
                         f"({source!r}). Check that row of the dataset, or drop it.")
    if isinstance(source, UnsearchedFolder):
        raise ImageError(item.key, "unreadable", f"{item.key}: this folder could not be searched "
                         f"({source.reason}), so any images in it were not captioned. Make it readable "
                         "(e.g. chmod a+rx) and run again.")
    if isinstance(source, str) and _URL.match(source):
        raise ImageError(item.key, "is_a_url", f"{item.key}: is a URL; vlmlab reads local files and does not "
                         "download images. Download it first (e.g. urllib.request.urlretrieve(url, 'cat.png')).")
    if isinstance(source, (bytes, bytearray)):
        return _decode(item.key, io.BytesIO(source), max_pixels)
    if isinstance(source, Image.Image):
        return _decode(item.key, source, max_pixels)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        _check_path(item.key, path)
        try:
            with open(path, "rb") as f:
                return _decode(item.key, f, max_pixels)
        except OSError as e:  # from open(); _decode() raises only ImageError
            raise os_error(item.key, e) from e
    raise ImageError(item.key, "unsupported", f"{item.key}: cannot open a "
                     f"{_type_name(source)}; expected a path, bytes or PIL image.")


def _check_path(key: str, path: Path) -> None:
    """Diagnose problems visible from the file system, before reading."""
    try:
        st = path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ImageError(key, "broken_symlink", f"{key}: is a symbolic link loop (following the links "
                             "leads back to where they started). Fix or remove the link.") from e
        try:
            target = os.readlink(path) if isinstance(e, FileNotFoundError) and path.is_symlink() else None
        except OSError:
            target = None
        if target is not None:
            raise ImageError(key, "broken_symlink", f"{key}: is a symbolic link to "
                             f"{target!r}, which does not exist. Fix or "
                             "remove the link.") from e
        raise os_error(key, e) from e
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(key, "is_a_directory", f"{key}: is a folder, not an image "
                         "file. Pass the folder to collect() to caption the images in it.")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(key, "not_a_file", f"{key}: is not a regular file (a FIFO, "
                         "socket or device); reading it could block. Pass image files only.")
    if st.st_size == 0:
        raise ImageError(key, "empty", f"{key}: the file is empty (0 bytes), probably "
                         "an interrupted download or copy. Fetch or export it again.")


def _decode(key: str, src: Any, max_pixels: int) -> Image.Image:
    """Open (header only), check the size, force a full decode, convert."""
    try:
        im = src if isinstance(src, Image.Image) else Image.open(src, formats=_formats())
        _check_size(key, im, max_pixels)
        im.load()  # Pillow is lazy: truncation and corrupt data show up here
        im = _exif_transpose(im)
        return to_rgb(im)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # The warning arrives as an exception only under a warnings "error" filter.
        raise ImageError(key, "too_large", f"{key}: {e} Pillow refuses it; if the image "
                         "is trusted, raise PIL.Image.MAX_IMAGE_PIXELS and max_pixels.") from e
    except MemoryError as e:
        raise ImageError(key, "too_large", f"{key}: ran out of memory decoding it. "
                         "Pass a smaller max_pixels, or downscale the image.") from e
    except Exception as e:  # Pillow plugins raise many types; none may crash a run
        raise classify(key, src, e) from e


def _formats() -> list[str]:
    """Every format Pillow can open (plugins registered later included) except
    EPS, whose decoding runs Ghostscript in a subprocess on untrusted input."""
    Image.init()
    return [f for f in Image.OPEN if f != "EPS"]


def _check_size(key: str, im: Image.Image, max_pixels: int) -> None:
    w, h = im.size
    if w * h > max_pixels:
        raise ImageError(key, "too_large", f"{key}: {w}x{h} = {w * h:,} pixels exceeds "
                         f"max_pixels={max_pixels:,} (decompression-bomb guard). "
                         "Downscale the image, or pass a larger max_pixels if you trust it.")
    if w == 0 or h == 0:
        raise ImageError(key, "corrupt", f"{key}: the header says the image is {w}x{h}. "
                         "Re-export the image.")


def _exif_transpose(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # a damaged EXIF block must not cost the image
        return im


# ------------------------------------------------------------- conversion


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited on white."""
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        im = Image.fromarray(_to_uint8(np.asarray(im)))
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """Scale 16-bit, 32-bit and float samples to 0..255.

    Floats in 0..1 are scaled by 255; values already in 0..255 are kept; values
    in 0..65535 are treated as 16-bit; anything else is stretched min..max.
    """
    is_float = np.issubdtype(a.dtype, np.floating)
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(a.min()), float(a.max())
    if is_float and lo >= 0 and hi <= 1:
        a = a * 255.0
    elif lo >= 0 and hi <= 255:
        pass
    elif lo >= 0 and hi <= 65535:
        a = a / 257.0
    else:
        a = (a - lo) / ((hi - lo) or 1.0) * 255.0
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)
