"""Tests for vlmlab.run.journal: the append-only JSONL journal."""

import json
import threading

import numpy as np
import pytest

from vlmlab.run import journal as journal_mod
from vlmlab.run.journal import Journal, JournalError


def _lines(path):
    return path.read_bytes().decode().splitlines()


def test_append_done_rows_and_resume(tmp_path):
    path = tmp_path / "deep/er/captions.jsonl"  # parent folders are created
    with Journal(path) as j:
        assert j.done() == {} and j.rows() == []
        j.append([{"key": "a", "caption": "cat"}, {"key": "b", "caption": "dog"}])
        j.append([{"key": "c", "caption": "émoji ✓"}])
        assert list(j.done()) == ["a", "b", "c"]
    again = Journal(path)  # a new run resumes from what is on disk
    assert again.done()["c"]["caption"] == "émoji ✓"
    todo = [k for k in ["a", "b", "c", "d"] if k not in again.done()]
    assert todo == ["d"]
    with again:
        again.append([{"key": "d", "caption": "owl"}])
    assert [r["key"] for r in Journal(path).rows()] == ["a", "b", "c", "d"]
    assert all(json.loads(line) for line in _lines(path))


def test_torn_last_line_is_ignored_then_cut_off(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_text('{"key": "a"}\n{"key": "b"}\n{"key": "c", "capt')
    j = Journal(path)
    assert list(j.done()) == ["a", "b"]
    assert path.read_text().endswith('"capt')  # reading alone changes nothing
    j.append([{"key": "c", "caption": "redone"}])
    j.close()
    assert _lines(path) == ['{"key": "a"}', '{"key": "b"}',
                            '{"key": "c", "caption": "redone"}']


def test_torn_multibyte_character_is_a_torn_line(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_bytes(b'{"key": "a"}\n' + '{"key": "b", "c": "é'.encode()[:-1])
    assert list(Journal(path).done()) == ["a"]


def test_complete_last_row_without_newline_is_kept(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_text('{"key": "a"}\n{"key": "b"}')  # e.g. edited by hand
    with Journal(path) as j:
        assert list(j.done()) == ["a", "b"]
        j.append([{"key": "c"}])
    assert [json.loads(x)["key"] for x in _lines(path)] == ["a", "b", "c"]


def test_bad_middle_line_is_a_clear_error(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_text('{"key": "a"}\nnot json at all\n{"key": "c"}\n')
    with pytest.raises(JournalError, match="line 2 is not valid JSON") as info:
        Journal(path).done()
    assert str(path) in str(info.value) and "delete that line" in str(info.value)
    with pytest.raises(JournalError, match="line 2"):
        Journal(path).append([{"key": "d"}])  # never appends after damage
    assert path.read_text().count("\n") == 3


def test_line_without_key_is_a_clear_error(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_text('{"key": "a"}\n[1, 2]\n{"key": "c"}\n')
    with pytest.raises(JournalError, match="line 2 is not a JSON object with a 'key'"):
        Journal(path).rows()


def test_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_text('{"key": "a"}\n\n{"key": "b"}\n')
    assert list(Journal(path).done()) == ["a", "b"]


def test_directory_path_is_a_clear_error(tmp_path):
    with pytest.raises(JournalError, match="is a folder"):
        Journal(tmp_path)


def test_fsync_once_per_append(tmp_path, monkeypatch):
    calls = []
    real_fsync = journal_mod.os.fsync
    monkeypatch.setattr(journal_mod.os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd)))
    with Journal(tmp_path / "j.jsonl") as j:
        j.append([{"key": str(i)} for i in range(100)])
        assert len(calls) == 1
        j.append([{"key": "x"}])
        assert len(calls) == 2
        j.append([])  # nothing to write, nothing to sync
        assert len(calls) == 2
    assert len(Journal(tmp_path / "j.jsonl").rows()) == 101


def test_rows_are_durable_before_close(tmp_path):
    path = tmp_path / "j.jsonl"
    j = Journal(path)
    j.append([{"key": "a"}])
    assert _lines(path) == ['{"key": "a"}']  # flushed, readable by anyone now
    j.close()


def test_later_row_for_a_key_overrides(tmp_path):
    with Journal(tmp_path / "j.jsonl") as j:
        j.append([{"key": "a", "caption": None, "error": "timeout"}])
        j.append([{"key": "a", "caption": "a cat", "error": None}])
        assert j.done()["a"]["caption"] == "a cat"
        assert len(j.rows()) == 2  # the history is kept


def test_invalid_rows_are_rejected_before_writing(tmp_path):
    path = tmp_path / "j.jsonl"
    with Journal(path) as j:
        with pytest.raises(ValueError, match="list of dicts"):
            j.append([{"key": "a"}, {"caption": "no key"}])
        with pytest.raises(ValueError, match="list of dicts"):
            j.append({"key": "a"})  # a single dict, not a list
    assert not path.exists() or path.read_text() == ""


def test_numpy_values_are_written_as_json(tmp_path):
    with Journal(tmp_path / "j.jsonl") as j:
        j.append([{"key": "a", "score": np.float32(0.5), "n": np.int64(3),
                   "box": np.array([1, 2])}])
        assert j.done()["a"] == {"key": "a", "score": 0.5, "n": 3, "box": [1, 2]}


def test_failed_write_leaves_no_torn_line_behind(tmp_path, monkeypatch):
    path = tmp_path / "j.jsonl"
    j = Journal(path)
    j.append([{"key": "a"}])

    def crash(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(journal_mod.os, "fsync", crash)
    with pytest.raises(OSError):
        j.append([{"key": "b"}])
    monkeypatch.undo()
    with open(path, "ab") as f:  # as if the failed write had torn its line
        f.write(b'{"key": "c", "cap')
    j.append([{"key": "d"}])  # reopens, cuts the torn tail first
    j.close()
    assert [r["key"] for r in Journal(path).rows()] == ["a", "b", "d"]


def test_thread_safe_appends(tmp_path):
    path = tmp_path / "j.jsonl"
    j = Journal(path)
    n_threads, n_batches, batch = 8, 40, 5

    def worker(t):
        for b in range(n_batches):
            j.append([{"key": f"{t}-{b}-{i}", "t": t, "b": b, "pad": "x" * 500}
                      for i in range(batch)])

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    j.close()
    rows = Journal(path).rows()
    assert len(rows) == n_threads * n_batches * batch
    assert len({r["key"] for r in rows}) == len(rows)
    for start in range(0, len(rows), batch):  # each batch landed in one piece
        chunk = rows[start:start + batch]
        assert len({(r["t"], r["b"]) for r in chunk}) == 1
