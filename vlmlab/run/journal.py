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

One run at a time: the first append (or :meth:`Journal.lock`) takes an exclusive lock on the file
that lasts until :meth:`Journal.close`; a second run on the same journal is refused with
:class:`JournalInUseError`, naming the process that holds it. Only regular files are journals
(a FIFO or a device would block or never end), and a file that is not a vlmlab journal (a line
that is not a row, or a last line that is not a torn row) is refused, never cut or overwritten.

Duplicates: if a key appears on several lines (e.g. a retried image), the
**last** line wins in :meth:`Journal.done`; :meth:`Journal.rows` returns every
line in file order.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path
from typing import Any, Iterable


try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one run per journal is then up to the user
    fcntl = None

ROW_START = b'{"key": '  # every row vlmlab writes starts so: a torn last line of a journal does too


class JournalError(ValueError):
    """The journal file cannot be used as it is; the message says why and what to do."""


class JournalInUseError(JournalError):
    """Another run (another process, or another caption() in this one) is writing this journal."""


class Journal:
    """An append-only JSONL file of result rows. Thread-safe; a context manager."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.is_dir():
            raise JournalError(f"Journal path {str(self.path)!r} is a folder; give a "
                               "file path such as 'out/captions.jsonl'.")
        try:
            mode = os.stat(self.path).st_mode
        except OSError:
            mode = None  # missing (created on first append), or unreachable (said on first use)
        if mode is not None and not stat.S_ISREG(mode):
            raise JournalError(f"Journal path {str(self.path)!r} is not a regular file (a FIFO, device or "
                               "socket); journals are regular files: give a path such as 'out/captions.jsonl'.")
        self._lock = threading.Lock()
        self._file = None  # opened lazily by the first append
        self._lock_fd = None  # held from lock() to close()
        self._created = False

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

    def _foreign(self, what: str) -> JournalError:
        return JournalError(
            f"{self.path} is not a vlmlab journal ({what}). vlmlab never cuts or overwrites a file it did not "
            "write: pick another out= path, or move this file away.")

    def _parse(self, line: bytes, number: int) -> dict[str, Any]:
        try:
            row = json.loads(line)
        except ValueError as e:
            if number == 1 and not line.startswith(ROW_START):
                raise self._foreign(f"line 1 is not valid JSON: {e}") from None
            raise JournalError(
                f"{self.path}: line {number} is not valid JSON ({e}); only the last "
                "line can be torn by a crash, so the file was edited or damaged. Fix "
                "or delete that line (or move the file away to start over).") from None
        if not isinstance(row, dict) or "key" not in row:
            raise self._foreign(f"line {number} is not a JSON object with a 'key' field")
        return row

    def _parse_tail(self, tail: bytes) -> dict[str, Any] | None:
        """The last line when it lacks a newline: a complete row, or None for a row torn by a crash."""
        try:
            row = json.loads(tail)
        except ValueError:
            if tail.startswith(ROW_START) or ROW_START.startswith(tail):
                return None
            raise self._foreign("its last line is neither a row nor the start of one") from None
        if not isinstance(row, dict) or "key" not in row:
            raise self._foreign("its last line is not a JSON object with a 'key' field")
        return row

    # ------------------------------------------------------------ writing

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        """Write one line per row, then flush and fsync once for the whole call."""
        lines = []
        for row in rows:
            if not isinstance(row, dict) or "key" not in row:
                raise ValueError("Journal.append() takes a list of dicts, each with a "
                                 f"'key'; got {row!r}")
            lines.append(_encode(row))
        if not lines:
            return
        with self._lock:
            f = self._file or self._open_for_append()
            try:
                f.write(b"".join(lines))
                f.flush()
                os.fsync(f.fileno())
            except BaseException:  # e.g. disk full: reopen next time, which cuts
                self._file = None  # off whatever part of a line got written
                _close_quietly(f)
                raise

    def lock(self) -> "Journal":
        """Take the journal for this run (created if missing) until :meth:`close`; raises
        :class:`JournalInUseError` naming the holder when another run has it."""
        if self._lock_fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        existed = self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _lock_holder(fd)
                os.close(fd)
                raise JournalInUseError(
                    f"{self.path} is in use by another run ({holder}). Two runs on one journal would both "
                    "caption everything and could drop each other's rows: wait for that run to finish or stop "
                    "it, or give this run another out= file.") from None
        self._lock_fd, self._created = fd, not existed
        return self

    def _open_for_append(self):
        """Open once: lock, create parent folders, cut off a torn last line."""
        self.lock()
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
            if self._lock_fd is not None:
                if self._created and os.fstat(self._lock_fd).st_size == 0:
                    _unlink_quietly(self.path)  # made by lock() and never written: leave no trace
                os.close(self._lock_fd)  # releases the lock
                self._lock_fd = None

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Journal({str(self.path)!r})"


def _encode(row: dict) -> bytes:
    """One JSON line. A file name that is not UTF-8 (held by Python as lone surrogates) is written
    \\u-escaped, which reads back to the same str; everything else stays readable UTF-8."""
    try:
        return (json.dumps(row, ensure_ascii=False, default=_jsonable) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(row, ensure_ascii=True, default=_jsonable) + "\n").encode("ascii")


def _lock_holder(fd: int) -> str:
    """Who holds the lock on ``fd``'s file: 'pid N (command)' from /proc/locks where there is one."""
    inode = os.fstat(fd).st_ino
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 5 and parts[1] == "FLOCK" and parts[5].rsplit(":", 1)[-1] == str(inode):
                    pid = int(parts[4])
                    if pid == os.getpid():
                        return f"pid {pid}, this process"
                    try:
                        with open(f"/proc/{pid}/cmdline", "rb") as c:
                            cmd = c.read().replace(b"\0", b" ").decode(errors="replace").strip()
                    except OSError:
                        cmd = ""
                    return f"pid {pid}" + (f": {cmd[:120]}" if cmd else "")
    except OSError:
        pass
    return "another process"


def _unlink_quietly(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


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
ROW_FIELDS = ("image", "caption", "error", "error_kind", "n_tokens", "latency_ms", "batch_size", "device", "replica")


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
    journal = Journal(out).lock()  # one run per journal, from before it is read until the run ends
    try:
        rows = journal.rows()
        _check_resumable(out, rows, resume, model, prompt)
    except BaseException:
        journal.close()
        raise
    done = {}
    for r in rows:  # the last row of a key wins; keys that had an error are tried again
        done[r["key"]] = r
    return journal, {k: _result_row(r) for k, r in done.items() if _is_captioned(r)}


def _check_resumable(out, rows, resume, model, prompt):
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


def _is_captioned(row) -> bool:
    """A row that counts as done on resume: a caption and no error (hand-edited rows may lack either)."""
    return isinstance(row.get("caption"), str) and not row.get("error")
