"""Issue 14, data safety (items 1-7): nothing lost, nothing hung, no file destroyed.

Only the public API (``vlmlab.caption``, ``vlmlab.plan``); the worker tests spawn two CPU replicas
of the bundled captioner and keep to a few images.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import threading
import time

import pytest
from PIL import Image

import vlmlab
from tests import fault_images


def _image(path, colour="red"):
    Image.new("RGB", (16, 16), colour).save(path)
    return path


def _not_an_image(path):
    path.write_text("these are notes, not pixels\n")
    return str(path)


def _journal_lines(path):
    return [json.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


# ---- 1. file names that are not UTF-8 ------------------------------------------------------------

def test_1_a_file_name_that_is_not_utf8_is_captioned_and_the_run_resumes(tmp_path, lm):
    folder = tmp_path / "d"
    folder.mkdir()
    odd = folder / os.fsdecode(b"caf\xe9.png")
    _image(odd)
    _image(folder / "plain.png", "blue")
    out = tmp_path / "j.jsonl"
    first = vlmlab.caption(str(folder), out=str(out), progress=False)
    assert len(first) == 2 and first.ok, first.errors
    assert str(odd) in first.captions
    again = vlmlab.caption(str(folder), out=str(out), progress=False)
    assert again.resumed == 2 and again.captions == first.captions
    assert len(_journal_lines(out)) == 2


# ---- 2. never destroy a file vlmlab did not write --------------------------------------------------

@pytest.mark.parametrize("content", [b'{"a": 1}', b'{"a": 1}\n', b"plain notes", b"\x00\x01\x02 binary",
                                     b'{"key": "x.png", "caption": "a row"}\n{"a": 1}'])
def test_2_out_naming_a_file_vlmlab_did_not_write_is_refused_and_left_as_it_was(tmp_path, content):
    meta = tmp_path / "meta.json"
    meta.write_bytes(content)
    bad = _not_an_image(tmp_path / "notes.png")  # no model is needed to fail on it
    with pytest.raises(ValueError, match="not a vlmlab journal|not valid JSON|not a JSON object"):
        vlmlab.caption(bad, out=str(meta), progress=False)
    assert meta.read_bytes() == content


# ---- 3. one run per journal --------------------------------------------------------------------------

def test_3_a_second_run_on_a_journal_in_use_refuses_and_names_the_holder(tmp_path):
    out = tmp_path / "j.jsonl"
    blocking, gate = fault_images.waiting("journal-lock")
    outcome = {}

    def first_run():
        try:
            outcome["result"] = vlmlab.caption([blocking], out=str(out), progress=False)
        except BaseException as err:  # noqa: BLE001 - reported by the assertions below
            outcome["error"] = err

    t = threading.Thread(target=first_run)
    t.start()
    try:
        time.sleep(0.5)
        bad = _not_an_image(tmp_path / "other.png")
        with pytest.raises(Exception) as err:
            vlmlab.caption(bad, out=str(out), progress=False)
        assert "in use" in str(err.value) and str(os.getpid()) in str(err.value), err.value
    finally:
        gate.set()
        t.join(60)
    assert "error" not in outcome, outcome.get("error")
    rows = _journal_lines(out)
    assert [r["key"] for r in rows] == ["pil:0"]  # the refused run wrote nothing
    assert vlmlab.caption(bad, out=str(out), progress=False).errors  # free again once the first run ended


# ---- 4. journals are regular files --------------------------------------------------------------------

def _caption_with_deadline(target, out, seconds=60):
    """caption(out=...) in a thread; a FIFO that blocks it is opened from here so the thread ends."""
    def unblock(thread):
        if os.path.exists(out) and not os.path.isfile(out):
            for flags in (os.O_WRONLY | os.O_NONBLOCK, os.O_RDONLY | os.O_NONBLOCK):
                try:
                    os.close(os.open(out, flags))
                except OSError:
                    pass
            thread.join(10)

    return _run_guarded(lambda: vlmlab.caption(target, out=out, progress=False), seconds, unblock)


def test_4_a_fifo_as_journal_is_refused_at_once(tmp_path):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    bad = _not_an_image(tmp_path / "x.png")
    hung, outcome = _caption_with_deadline(bad, str(fifo), seconds=30)
    assert not hung, "caption(out=FIFO) blocked"
    assert "regular file" in str(outcome.get("error")), outcome


@pytest.mark.parametrize("device", ["/dev/null"])  # /dev/zero is in scripts/fuzz.py, under a memory limit
def test_4_a_device_as_journal_is_refused(tmp_path, device):
    if not os.path.exists(device):
        pytest.skip(f"no {device}")
    bad = _not_an_image(tmp_path / "x.png")
    hung, outcome = _caption_with_deadline(bad, device, seconds=30)
    assert not hung
    assert "regular file" in str(outcome.get("error")), outcome


# ---- 7. hand-edited journal rows -------------------------------------------------------------------

def test_7_journal_rows_without_a_string_caption_are_captioned_again(tmp_path, lm):
    images = [str(_image(tmp_path / f"{c}.png", c)) for c in ("red", "green", "blue", "white")]
    out = tmp_path / "j.jsonl"
    vlmlab.caption(images[:1], out=str(out), progress=False)
    model, prompt = _journal_lines(out)[0]["model"], _journal_lines(out)[0]["prompt"]
    edited = [{"key": images[1], "model": model, "prompt": prompt},  # no caption at all
              {"key": images[2], "caption": 5, "error": None, "model": model, "prompt": prompt},
              {"key": images[3], "caption": None, "error": None, "model": model, "prompt": prompt}]
    with open(out, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in edited)
    result = vlmlab.caption(images, out=str(out), progress=False)
    assert result.resumed == 1
    assert result.ok and all(isinstance(c, str) and c for c in result.captions.values())
    assert len(result.captions) == 4


# ---- 5, 6. workers that crash or hang ---------------------------------------------------------------

@pytest.fixture(scope="module")
def two_cpu_replicas():
    return vlmlab.plan(None, gpus="2xcpu", strategy="replicate", dtype="float32")


def _run_guarded(fn, seconds, on_hang=None):
    """Run fn in a thread; if it is still running after ``seconds``, call ``on_hang(thread)`` (by
    default: wake stopped workers with SIGCONT and wait) so it can end, and report the hang."""
    outcome = {}

    def run():
        try:
            outcome["result"] = fn()
        except BaseException as err:  # noqa: BLE001
            outcome["error"] = err

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    hung = t.is_alive()
    if hung:
        (on_hang or _wake_workers)(t)
    return hung, outcome


def _wake_workers(thread):
    for child in mp.active_children():
        os.kill(child.pid, signal.SIGCONT)
    thread.join(120)


@pytest.mark.slow
def test_5_an_image_that_kills_every_worker_is_isolated_with_an_error_row(tmp_path, two_cpu_replicas):
    good = [str(_image(tmp_path / f"g{i}.png", c)) for i, c in enumerate(("red", "blue", "green"))]
    images = [good[0], fault_images.crashing(), good[1], good[2]]
    out = tmp_path / "j.jsonl"
    hung, outcome = _run_guarded(lambda: vlmlab.caption(images, model=two_cpu_replicas, batch_size=2,
                                                         out=str(out), progress=False), 400)
    assert not hung
    result = outcome.get("result")
    assert result is not None, outcome.get("error")
    assert [r["image"] for r in result.rows] == [good[0], "pil:1", good[1], good[2]]
    assert set(result.captions) == set(good)
    bad = result.rows[1]
    assert bad["error_kind"] == "crashed" and "worker" in bad["error"], bad
    assert any("died" in w for w in result.warnings), result.warnings
    keys = [r["key"] for r in _journal_lines(out)]
    assert sorted(keys) == sorted([good[0], "pil:1", good[1], good[2]])  # each exactly once
    assert not mp.active_children()


@pytest.mark.slow
def test_6_a_stopped_worker_has_its_batch_requeued_and_is_reported(tmp_path, two_cpu_replicas, monkeypatch):
    monkeypatch.setenv("VLMLAB_HANG_MIN_S", "8")
    good = [str(_image(tmp_path / f"g{i}.png", c)) for i, c in enumerate(("red", "blue", "green", "white"))]
    marker = tmp_path / "stopped.pid"
    images = [good[0], fault_images.stop_once(marker), *good[1:]]
    hung, outcome = _run_guarded(lambda: vlmlab.caption(images, model=two_cpu_replicas, batch_size=1,
                                                         progress=False), 240)
    assert marker.exists(), "no worker opened the stopping image"
    assert not hung, "a stopped worker blocked the run"
    result = outcome.get("result")
    assert result is not None, outcome.get("error")
    assert result.ok and len(result.captions) == 5  # the stopped worker's image was done by another
    assert any("not responding" in w or "hung" in w for w in result.warnings), result.warnings
    assert not mp.active_children()
