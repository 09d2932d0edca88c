"""Append-only JSONL journal, so an interrupted captioning run resumes where it stopped.

One JSON object per line, one line per image, each with at least ``"key"``
(the :class:`vlmlab.run.images.ImageItem` key)::

    with Journal("out/captions.jsonl") as j:
        done = j.done()                      # {key: row} already captioned
        todo = [it for it in items if it.key not in done]
        for batch in batches(todo):
            j.append([{"key": ..., "caption": ...}, ...])  # durable on return

Durability: each :meth:`Journal.append` call writes its rows, then flushes and
``os.fsync``\\ s once, so a batch is on disk when ``append`` returns. A crash
mid-write leaves at most a torn last line (no trailing newline); readers ignore
it and the next append cuts it off first, so the file never holds a half row
in the middle. A malformed line *before* the last one is not a crash artefact
and raises :class:`JournalError`.

Duplicates: if a key appears on several lines (e.g. a retried image), the
**last** line wins in :meth:`Journal.done`; :meth:`Journal.rows` returns every
line in file order.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Iterable


class JournalError(ValueError):
    """The journal file cannot be used as it is; the message says why and what to do."""


class Journal:
    """An append-only JSONL file of result rows. Thread-safe; a context manager."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.is_dir():
            raise JournalError(f"Journal path {str(self.path)!r} is a folder; give a "
                               "file path such as 'out/captions.jsonl'.")
        self._lock = threading.Lock()
        self._file = None  # opened lazily by the first append

    # ------------------------------------------------------------ reading

    def rows(self) -> list[dict[str, Any]]:
        """Every complete row, in file order (a torn last line is ignored)."""
        with self._lock:
            return self._read()[0]

    def done(self) -> dict[str, dict[str, Any]]:
        """``{key: row}`` for every key in the journal; a later row for a key
        overrides an earlier one."""
        return {row["key"]: row for row in self.rows()}

    def _read(self) -> tuple[list[dict[str, Any]], int]:
        """Parse the file: (rows, byte length of the part worth keeping)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return [], 0
        lines = data.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline
        rows = [self._parse(line, n) for n, line in enumerate(lines, 1) if line.strip()]
        if tail.strip():
            row = self._parse_tail(tail)
            if row is None:  # torn by a crash: ignore it, cut it off on append
                return rows, len(data) - len(tail)
            rows.append(row)  # a complete row that only lacks its newline
        return rows, len(data)

    def _parse(self, line: bytes, number: int) -> dict[str, Any]:
        try:
            row = json.loads(line)
        except ValueError as e:
            raise JournalError(
                f"{self.path}: line {number} is not valid JSON ({e}); only the last "
                "line can be torn by a crash, so the file was edited or damaged. Fix "
                "or delete that line (or move the file away to start over).") from None
        if not isinstance(row, dict) or "key" not in row:
            raise JournalError(f"{self.path}: line {number} is not a JSON object with a "
                               "'key' field. Fix or delete that line.")
        return row

    @staticmethod
    def _parse_tail(tail: bytes) -> dict[str, Any] | None:
        try:
            row = json.loads(tail)
        except ValueError:
            return None
        return row if isinstance(row, dict) and "key" in row else None

    # ------------------------------------------------------------ writing

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        """Write one line per row, then flush and fsync once for the whole call."""
        lines = []
        for row in rows:
            if not isinstance(row, dict) or "key" not in row:
                raise ValueError("Journal.append() takes a list of dicts, each with a "
                                 f"'key'; got {row!r}")
            lines.append(json.dumps(row, ensure_ascii=False, default=_jsonable) + "\n")
        if not lines:
            return
        with self._lock:
            f = self._file or self._open_for_append()
            try:
                f.write("".join(lines).encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
            except BaseException:  # e.g. disk full: reopen next time, which cuts
                self._file = None  # off whatever part of a line got written
                _close_quietly(f)
                raise

    def _open_for_append(self):
        """Open once: create parent folders, cut off a torn last line."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _, keep = self._read()  # also validates the existing lines
        f = open(self.path, "a+b")  # writes always go to the end
        if f.seek(0, os.SEEK_END) > keep:
            f.truncate(keep)
        elif keep:
            f.seek(keep - 1)
            if f.read(1) != b"\n":  # the last row was complete but lacked its newline
                f.write(b"\n")
        self._file = f
        return f

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Journal({str(self.path)!r})"


def _jsonable(obj: Any) -> Any:
    """numpy scalars and arrays become plain JSON values; anything else its str()."""
    return obj.tolist() if hasattr(obj, "tolist") else str(obj)


def _close_quietly(f) -> None:
    try:
        f.close()
    except OSError:
        pass


# ---- caption journals: rows keyed by image, tagged with the model and prompt that made them
class JournalMismatchError(ValueError):
    """The ``out`` journal was written by another model or prompt; resuming would mix them."""


_META = ("model", "prompt")
#: the columns of a caption row (``vlmlab.run.batch`` writes them)
ROW_FIELDS = ("image", "caption", "error", "error_kind", "n_tokens", "latency_ms", "batch_size", "device")


def journal_row(row, model, prompt) -> dict:
    out = {"key": row["image"], **{k: v for k, v in row.items() if k != "image"}}
    out.update(model=model, prompt=prompt)
    return out


def _result_row(jrow) -> dict:
    row = {"image": jrow["key"], **{k: v for k, v in jrow.items() if k not in ("key", *_META)}}
    for k in ROW_FIELDS:
        row.setdefault(k, None)
    return row


def open_caption_journal(out, resume, model, prompt):
    """(Journal or None, {key: result row} of images already captioned there)."""
    if out is None:
        return None, {}
    journal = Journal(out)
    rows = journal.rows()
    if rows and not resume:
        raise FileExistsError(f"{out} already holds {len(rows)} caption row(s). vlmlab never overwrites a "
                              f"journal: delete it (or pick another out=) to start over, or pass resume=True to "
                              f"continue it.")
    others = {(r.get("model"), r.get("prompt")) for r in rows} - {(model, prompt)}
    if others:
        m, p = sorted(others, key=str)[0]
        raise JournalMismatchError(
            f"{out} holds captions from model {m!r} with prompt {p!r}; this run uses model {model!r} with "
            f"prompt {prompt!r}. Resuming would mix the two: pick another out= file, delete this one, or run "
            f"with the same model and prompt.")
    done = {}
    for r in rows:  # the last row of a key wins; keys that had an error are tried again
        done[r["key"]] = r
    return journal, {k: _result_row(r) for k, r in done.items() if not r.get("error")}
