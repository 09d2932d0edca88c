"""Tests for vlmlab.run.images: collect() and open_image()."""

import dataclasses
import io
import os
import pickle
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from tests.badimages import (EXPLICIT_ONLY, VALID_SIZES, make_broken_zoo,
                             make_valid_zoo)
from vlmlab.run import images
from vlmlab.run.images import (ERROR_KINDS, ImageError, ImageItem, collect,
                           open_image)


@pytest.fixture(scope="module")
def valid_zoo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("valid")
    return folder, make_valid_zoo(folder)


@pytest.fixture(scope="module")
def broken_zoo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("broken")
    return folder, make_broken_zoo(folder)


def _open_path(path, **kw):
    return open_image(ImageItem(str(path), Path(path)), **kw)


def _error(item, **kw) -> ImageError:
    with pytest.raises(ImageError) as info:
        open_image(item, **kw)
    return info.value


# ------------------------------------------------------------ valid images


@pytest.mark.parametrize("name", sorted(VALID_SIZES))
def test_valid_kinds_open_to_rgb(valid_zoo, name):
    folder, _ = valid_zoo
    im = _open_path(folder / name)
    assert im.mode == "RGB"
    assert im.size == VALID_SIZES[name]
    im.getpixel((0, 0))  # pixels are really there


def test_valid_zoo_is_big_enough(valid_zoo):
    assert len(valid_zoo[1]) >= 10
    assert all(v is None for v in valid_zoo[1].values())


def test_transparent_pixels_become_white(valid_zoo):
    folder, _ = valid_zoo
    for name in ("rgba.png", "la.png", "rgba_lossless.webp"):
        im = _open_path(folder / name)
        assert im.getpixel((0, 0)) == (255, 255, 255), name  # left half transparent
        assert im.getpixel((31, 0)) != (255, 255, 255), name  # right half opaque


def test_high_bit_depths_are_scaled_not_clipped(valid_zoo):
    folder, _ = valid_zoo
    for name in ("gray16.png", "int32.tif", "float32.tif"):
        a = np.asarray(_open_path(folder / name))[..., 0]
        assert a[:, 0].max() < 20 and a[:, -1].min() > 235, name  # a full 0..255 ramp
        assert len(np.unique(a)) > 10, name


def test_exif_orientation_is_applied(valid_zoo):
    folder, _ = valid_zoo
    with Image.open(folder / "exif_rotated.jpg") as raw:
        assert raw.size == (32, 24)
    assert _open_path(folder / "exif_rotated.jpg").size == (24, 32)


def test_animated_gives_first_frame(valid_zoo):
    folder, _ = valid_zoo
    for name in ("animated.gif", "animated.webp"):
        im = _open_path(folder / name)
        # frame 0 is dark on the left, frame 1 (mirrored) dark on the right
        assert im.getpixel((0, 12))[0] < 40 and im.getpixel((31, 12))[0] > 200, name


def test_format_is_detected_by_content(valid_zoo):
    folder, _ = valid_zoo
    assert _open_path(folder / "png_named.jpg").size == (32, 24)


def test_cmyk_colours_survive(valid_zoo):
    folder, _ = valid_zoo
    r, g, b = _open_path(folder / "cmyk.jpg").getpixel((31, 12))
    assert r > 200 and b < 180  # right edge of the ramp is red-ish, not inverted


# ----------------------------------------------------------- broken files


def test_broken_kinds_raise_specific_errors(broken_zoo):
    folder, zoo = broken_zoo
    assert len(zoo) >= 10 and len(set(zoo.values())) >= 9
    problems = []
    for name, kind in zoo.items():
        path = folder / name
        try:
            _open_path(path)
            problems.append(f"{name}: opened, expected {kind}")
        except ImageError as e:
            if e.kind != kind:
                problems.append(f"{name}: kind {e.kind!r}, expected {kind!r} ({e})")
            if name not in str(e) or e.key != str(path):
                problems.append(f"{name}: message does not name the file: {e}")
            if e.kind not in ERROR_KINDS:
                problems.append(f"{name}: undocumented kind {e.kind!r}")
        except Exception as e:  # anything but ImageError is a crash
            problems.append(f"{name}: crashed with {type(e).__name__}: {e}")
    assert not problems, "\n".join(problems)


def test_folder_scan_finds_all_but_explicit_only(broken_zoo, valid_zoo):
    folder, zoo = broken_zoo
    found = {Path(it.key).relative_to(folder).as_posix() for it in collect(folder)}
    assert found == set(zoo) - EXPLICIT_ONLY
    vfolder, vzoo = valid_zoo
    vfound = {Path(it.key).relative_to(vfolder).as_posix() for it in collect(vfolder)}
    assert vfound == set(vzoo)


def test_messages_say_what_to_do(broken_zoo):
    folder, _ = broken_zoo
    assert "pillow-heif" in str(_error(ImageItem("h", folder / "photo_heic.jpg")))
    assert "HTML" in str(_error(ImageItem("p", folder / "error_page.jpg")))
    assert "PNG" in str(_error(ImageItem("c", folder / "corrupt_header.png")))
    assert "gone.jpg" in str(_error(ImageItem("s", folder / "broken_symlink.jpg")))


def test_too_large_is_checked_before_decoding(valid_zoo, monkeypatch):
    folder, _ = valid_zoo

    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    e = _error(ImageItem("x", folder / "gray.png"), max_pixels=100)
    assert e.kind == "too_large" and "max_pixels=100" in str(e)


def test_max_pixels_can_be_raised(valid_zoo):
    folder, _ = valid_zoo
    assert _error(ImageItem("w", folder / "wide.png"), max_pixels=7999).kind == "too_large"
    assert _open_path(folder / "wide.png", max_pixels=8000).size == (4000, 2)


def test_pillow_bomb_warning_and_error_are_handled(tmp_path):
    from tests.badimages import _png_claiming

    path = tmp_path / "between.png"  # over Pillow's limit but under twice it
    path.write_bytes(_png_claiming(10_000, 9_000))
    item = ImageItem(str(path), path)
    with pytest.warns(Image.DecompressionBombWarning):
        assert _error(item).kind == "too_large"
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert _error(item).kind == "too_large"


def test_pillow_global_state_is_untouched(valid_zoo, broken_zoo):
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    for folder, zoo in (valid_zoo, broken_zoo):
        for name in zoo:
            try:
                _open_path(folder / name, max_pixels=10**12)
            except ImageError:
                pass
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_real(tmp_path):
    path = tmp_path / "secret.png"
    Image.new("RGB", (2, 2)).save(path)
    path.chmod(0)
    assert _error(ImageItem(str(path), path)).kind == "unreadable"


def test_unreadable_file_simulated(tmp_path, monkeypatch):
    path = tmp_path / "secret.png"
    Image.new("RGB", (2, 2)).save(path)

    def denied(file, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(images, "open", denied, raising=False)
    e = _error(ImageItem(str(path), path))
    assert e.kind == "unreadable" and "secret.png" in str(e) and "chmod" in str(e)


def test_fifo_does_not_hang(tmp_path):
    zoo = make_broken_zoo(tmp_path, fifo=True)
    assert zoo["pipe.png"] == "not_a_file"
    result = []
    t = threading.Thread(target=lambda: result.append(_error(
        ImageItem("pipe", tmp_path / "pipe.png")).kind), daemon=True)
    t.start()
    t.join(timeout=10)
    assert result == ["not_a_file"]


def test_image_error_pickles_and_has_fields():
    e = ImageError("a.png", "empty", "a.png: the file is empty")
    e2 = pickle.loads(pickle.dumps(e))
    assert (e2.key, e2.kind, e2.message, str(e2)) == ("a.png", "empty",
                                                      "a.png: the file is empty",
                                                      "a.png: the file is empty")
    assert isinstance(e2, Exception)


# -------------------------------------------------------- in-memory images


def test_pil_images_in_memory():
    rgba = Image.new("RGBA", (5, 4), (0, 0, 0, 0))
    items = collect([rgba, Image.new("I;16", (3, 3), 65535)])
    assert [it.key for it in items] == ["pil:0", "pil:1"]
    out = [open_image(it) for it in items]
    assert out[0].mode == "RGB" and out[0].getpixel((0, 0)) == (255, 255, 255)
    assert out[1].getpixel((0, 0)) == (255, 255, 255)
    assert rgba.mode == "RGBA"  # the caller's image is not modified


def test_lazy_pil_image_that_is_truncated(broken_zoo):
    folder, _ = broken_zoo
    with Image.open(folder / "truncated.png") as lazy:  # header only, not decoded yet
        e = _error(collect(lazy)[0])
    assert e.kind == "truncated" and e.key == "pil:0"


def test_bytes_and_dicts_from_datasets(valid_zoo, broken_zoo):
    png = (valid_zoo[0] / "gray.png").read_bytes()
    assert open_image(ImageItem("b", png)).size == (32, 24)
    assert open_image(ImageItem("d", {"bytes": png, "path": None})).size == (32, 24)
    text = (broken_zoo[0] / "text.png").read_bytes()
    assert _error(ImageItem("t", {"bytes": text})).kind == "not_an_image"
    assert _error(ImageItem("x", 42)).kind == "unsupported"


# ------------------------------------------------------------------ collect


def _touch_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (2, 2)).save(path, format="PNG")


def test_collect_folder_recursive_sorted_filtered(tmp_path):
    names = ["b.png", "a.JPG", "c.Jpeg", "sub/z.webp", "sub/a.gif", "sub/deep/x.tif",
             "img.tiff", "p.ppm", "g.pgm", "m.bmp"]
    for n in names:
        _touch_image(tmp_path / n)
    for n in ["notes.txt", ".hidden.png", ".cache/x.png", "sub/.also_hidden.jpg",
              "README", "sub/model.bin"]:
        _touch_image(tmp_path / n)
    keys = [Path(it.key).relative_to(tmp_path).as_posix() for it in collect(tmp_path)]
    assert keys == ["a.JPG", "b.png", "c.Jpeg", "g.pgm", "img.tiff", "m.bmp", "p.ppm",
                    "sub/a.gif", "sub/deep/x.tif", "sub/z.webp"]
    assert collect(str(tmp_path)) == collect(tmp_path)  # deterministic, str or Path
    assert all(isinstance(it.source, Path) for it in collect(tmp_path))


def test_collect_empty_folder_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    _touch_image(tmp_path / ".hidden.png")
    with pytest.raises(ValueError, match="No images found") as info:
        collect(tmp_path)
    assert str(tmp_path) in str(info.value) and "notes.txt" in str(info.value)
    with pytest.raises(ValueError, match="No images found"):
        collect([tmp_path / "elsewhere.png", tmp_path])  # inside a list too


def test_collect_single_file_missing_file_and_mixed_list(tmp_path):
    _touch_image(tmp_path / "one.png")
    _touch_image(tmp_path / "dir/two.png")
    pil = Image.new("L", (3, 3))
    missing = tmp_path / "nope.jpg"
    items = collect([str(tmp_path / "one.png"), pil, missing, tmp_path / "dir"])
    assert [it.key for it in items] == [str(tmp_path / "one.png"), "pil:1", str(missing),
                                        str(tmp_path / "dir/two.png")]
    assert items[1].source is pil
    assert _error(items[2]).kind == "not_found"  # reported at open time, not collect
    assert collect(tmp_path / "one.png")[0].key == str(tmp_path / "one.png")
    assert [it.key for it in collect(pil)] == ["pil:0"]
    assert collect([]) == []


def test_collect_repeated_paths_get_unique_keys(tmp_path):
    _touch_image(tmp_path / "a.png")
    keys = [it.key for it in collect([tmp_path / "a.png", str(tmp_path / "a.png")])]
    assert keys == [str(tmp_path / "a.png"), str(tmp_path / "a.png") + "#2"]


@pytest.mark.parametrize("bad", [42, None, b"bytes", {"a": 1}, np.zeros((2, 2, 3))])
def test_collect_rejects_unsupported_types(bad):
    with pytest.raises(TypeError, match="accepts a file or folder path") as info:
        collect(bad)
    assert type(bad).__name__ in str(info.value)


def test_collect_type_error_names_the_position(tmp_path):
    with pytest.raises(TypeError, match="at position 1"):
        collect([tmp_path / "x.png", 3.5])
    with pytest.raises(TypeError, match="column="):
        collect(tmp_path, column="image")


def test_image_item_is_frozen_and_hashable():
    item = ImageItem("pil:0", Image.new("RGB", (1, 1)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        item.key = "other"
    assert {item: 1}[ImageItem("pil:0", None)] == 1  # compared by key


# ------------------------------------------------------- datasets duck-type


class FakeDataset:
    """Just enough of datasets.Dataset: column_names, len, row access."""

    def __init__(self, rows):
        self._rows = rows
        self.column_names = list(rows[0])
        self.row_reads = 0

    def __len__(self):
        return len(self._rows)

    def __getitem__(self, i):
        if isinstance(i, str):
            return FakeColumn(self, i)
        self.row_reads += 1
        return self._rows[i]


class FakeColumn:
    """Like datasets>=4 Column: lazy, with .column_name."""

    def __init__(self, ds, name):
        self.source, self.column_name = ds, name

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        return self.source._rows[i][self.column_name]


@pytest.fixture
def fake_ds(valid_zoo, broken_zoo):
    png = (valid_zoo[0] / "gray.png").read_bytes()
    return FakeDataset([
        {"image": Image.new("RGBA", (4, 4), (0, 0, 0, 0)), "text": "a"},
        {"image": {"bytes": png, "path": None}, "text": "b"},
        {"image": str(valid_zoo[0] / "cmyk.jpg"), "text": "c"},
        {"image": {"bytes": b"", "path": str(broken_zoo[0] / "truncated.jpg")}, "text": "d"},
    ])


def test_collect_dataset_with_column(fake_ds):
    items = collect(fake_ds, column="image")
    assert [it.key for it in items] == [f"dataset:{i}" for i in range(4)]
    assert fake_ds.row_reads == 0  # nothing decoded at collect time
    sizes = [open_image(it).size for it in items[:3]]
    assert sizes == [(4, 4), (32, 24), (32, 24)]
    assert _error(items[3]).kind == "truncated"
    assert collect(fake_ds) == items  # "image" is the default column


def test_collect_dataset_column_object(fake_ds):
    items = collect(fake_ds["image"])
    assert [it.key for it in items] == [f"dataset:{i}" for i in range(4)]
    assert open_image(items[1]).size == (32, 24)


def test_collect_dataset_bad_column(fake_ds):
    with pytest.raises(ValueError, match="'picture' is not in the dataset"):
        collect(fake_ds, column="picture")
    two = FakeDataset([{"img": Image.new("RGB", (1, 1)), "text": "x"}])
    with pytest.raises(ValueError, match="say which holds the images"):
        collect(two)
    assert len(collect(two, column="img")) == 1


@dataclasses.dataclass
class Image_:  # stands in for datasets.Image, a dataclass with a decode flag
    decode: bool = True


Image_.__name__ = "Image"


class DecodingDataset(FakeDataset):
    """A dataset whose image column decodes to PIL unless cast to decode=False."""

    def __init__(self, raw_rows):
        super().__init__(raw_rows)
        self.features = {"image": Image_(decode=True), "text": object()}

    def cast_column(self, column, feature):
        out = DecodingDataset(self._rows)
        out.features = {**self.features, column: feature}
        return out

    def __getitem__(self, i):
        row = super().__getitem__(i)
        if self.features["image"].decode:
            return {**row, "image": Image.open(io.BytesIO(row["image"]["bytes"]))}
        return row


def test_dataset_image_column_is_read_undecoded(broken_zoo, valid_zoo):
    raw = [{"image": {"bytes": (valid_zoo[0] / "gray.png").read_bytes(), "path": None},
            "text": "ok"},
           {"image": {"bytes": (broken_zoo[0] / "bomb.png").read_bytes(), "path": None},
            "text": "bomb"}]
    items = collect(DecodingDataset(raw))
    assert items[0].source.dataset.features["image"].decode is False
    assert open_image(items[0]).size == (32, 24)
    assert _error(items[1], max_pixels=1000).kind == "too_large"


def test_dataset_rows_without_image_data():
    items = collect(FakeDataset([{"image": None}, {"image": b""}]))
    assert [_error(it).kind for it in items] == ["empty", "empty"]


def test_dataset_dict_asks_for_a_split():
    class FakeDatasetDict(dict):
        column_names = {"train": ["image"], "test": ["image"]}

    with pytest.raises(TypeError, match="pass one split"):
        collect(FakeDatasetDict(train=[], test=[]))


def test_dataset_decode_failure_is_an_image_error():
    class Exploding(FakeDataset):
        def __getitem__(self, i):
            raise OSError("cannot decode row")

    items = collect(Exploding([{"image": None}]))
    e = _error(items[0])
    assert e.kind == "corrupt" and "dataset:0" in str(e)


def test_a_folder_named_like_an_image_is_an_error_row_not_an_abort(tmp_path):
    from vlmlab.run.images import ImageError, collect, open_image

    (tmp_path / "shot.jpg").mkdir()
    good = tmp_path / "ok.png"
    Image.new("RGB", (4, 4)).save(good)
    items = collect([good, tmp_path / "shot.jpg"])
    assert [it.key for it in items] == [str(good), str(tmp_path / "shot.jpg")]
    with pytest.raises(ImageError) as err:
        open_image(items[1])
    assert err.value.kind == "is_a_directory"
