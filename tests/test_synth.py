"""Tests for the synthetic shape-scene generator `vlmlab.assets.scenes`."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vlmlab.assets import SAMPLES_DIR
from vlmlab.assets import scenes as synth

CAPTION_RE = re.compile(
    r"^(a|two|three) (red|green|blue|yellow|purple|black) "
    r"(circles?|squares?|triangles?|cross|crosses) (on the left|in the center|on the right)$"
)


@pytest.fixture(scope="module")
def scenes():
    return synth.make_dataset(300, seed=11)


def test_same_seed_same_scenes():
    a, b = synth.make_dataset(20, seed=5), synth.make_dataset(20, seed=5)
    for (ia, ca, oa), (ib, cb, ob) in zip(a, b):
        assert ca == cb and oa == ob
        assert np.array_equal(np.asarray(ia), np.asarray(ib))
    c = synth.make_dataset(20, seed=6)
    assert [s[1] for s in a] != [s[1] for s in c]
    assert not np.array_equal(np.asarray(a[0][0]), np.asarray(c[0][0]))


def test_make_scene_uses_only_the_given_rng():
    np.random.seed(0)
    first = synth.make_scene(np.random.default_rng(3))
    np.random.seed(1)
    second = synth.make_scene(np.random.default_rng(3))
    assert first[1] == second[1]
    assert np.array_equal(np.asarray(first[0]), np.asarray(second[0]))


def test_image_format(scenes):
    for image, _, _ in scenes[:20]:
        assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (64, 64)
    image, _, _ = synth.make_scene(np.random.default_rng(0), size=96)
    assert image.size == (96, 96)


def test_caption_grammar_matches_objects(scenes):
    count_words = {"a": 1, "two": 2, "three": 3}
    for _, caption, objects in scenes:
        m = CAPTION_RE.match(caption)
        assert m, caption
        assert 1 <= len(objects) <= 3
        assert count_words[m[1]] == len(objects)
        kinds = {o["kind"] for o in objects}
        colours = {o["colour"] for o in objects}
        positions = {o["position"] for o in objects}
        assert len(kinds) == len(colours) == len(positions) == 1
        kind, colour, position = kinds.pop(), colours.pop(), positions.pop()
        assert m[2] == colour
        noun = m[3]
        assert noun == (kind if len(objects) == 1 else {"cross": "crosses"}.get(kind, kind + "s"))
        assert m[4].endswith(position)
        assert synth.parse_caption(caption) == {"count": len(objects), "colour": colour, "kind": kind,
                                                "position": position}


def test_objects_lie_in_their_third_and_show_their_colour(scenes):
    for image, _, objects in scenes:
        pixels = np.asarray(image, dtype=float)
        for o in objects:
            third = ["left", "center", "right"].index(o["position"])
            assert third * 64 / 3 <= o["x"] < (third + 1) * 64 / 3
            centre = pixels[int(o["y"]), int(o["x"])]  # every shape covers its own centre
            assert np.abs(centre - synth.COLOURS[o["colour"]]).max() < 40, (o, centre)


def test_all_kinds_colours_counts_positions_occur(scenes):
    parsed = [synth.parse_caption(c) for _, c, _ in scenes]
    assert {p["kind"] for p in parsed} == set(synth.KINDS)
    assert {p["colour"] for p in parsed} == set(synth.COLOURS)
    assert {p["count"] for p in parsed} == {1, 2, 3}
    assert {p["position"] for p in parsed} == set(synth.POSITIONS)


def _background_kind(image, objects):
    """Classify the background from an object-free third of the image."""
    pixels = np.asarray(image, dtype=float)
    empty = [t for t in range(3) if t != ["left", "center", "right"].index(objects[0]["position"])][0]
    strip = pixels[:, int(empty * 64 / 3) + 2: int((empty + 1) * 64 / 3) - 2]
    roughness = np.abs(np.diff(strip, axis=0)).mean()
    if roughness > 3:
        return "noise"
    return "gradient" if np.ptp(strip, axis=(0, 1)).max() > 4 else "plain"


def test_varied_backgrounds(scenes):
    kinds = [_background_kind(img, objs) for img, _, objs in scenes]
    counts = {k: kinds.count(k) for k in synth.BACKGROUNDS}
    assert all(v >= 30 for v in counts.values()), counts  # each kind is roughly a third of 300
    corners = np.array([np.asarray(img, dtype=float)[:3, :3].mean(axis=(0, 1)) for img, _, _ in scenes])
    assert corners.min() > 150, "backgrounds are pale"
    assert corners.std(axis=0).min() > 8, "background colours vary"


def test_background_kinds_directly():
    rng = np.random.default_rng(0)
    plain = synth.make_background(rng, 32, "plain")
    gradient = synth.make_background(rng, 32, "gradient")
    noise = synth.make_background(rng, 32, "noise")
    assert np.ptp(plain, axis=(0, 1)).max() == 0
    assert np.ptp(gradient, axis=(0, 1)).max() > 0 and np.abs(np.diff(gradient, axis=0)).max() < 5
    assert np.abs(np.diff(noise, axis=0)).mean() > 3
    with pytest.raises(ValueError):
        synth.make_background(rng, 32, "stripes")


def test_save_samples(tmp_path):
    captions = synth.save_samples(tmp_path, n=3, seed=2)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(captions)
    assert json.loads((tmp_path / "captions.json").read_text()) == captions
    expected = [c for _, c, _ in synth.make_dataset(3, seed=2)]
    assert [captions[k] for k in sorted(captions)] == expected


def test_shipped_samples_match_generator():
    folder = SAMPLES_DIR
    captions = json.loads((folder / "captions.json").read_text())
    assert len(captions) == 8
    regenerated = synth.make_dataset(8, seed=synth.SAMPLES_SEED)
    for (name, caption), (image, ref, _) in zip(sorted(captions.items()), regenerated):
        assert caption == ref
        assert np.array_equal(np.asarray(Image.open(folder / name).convert("RGB")), np.asarray(image))


def test_no_torch_import():
    code = "import sys, vlmlab.assets.scenes; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
