"""PIL images that misbehave when opened, for the data-safety tests and scripts/fuzz.py.

They live in a module (not a test file) because spawned worker processes unpickle them by name.
Pillow pickles an image as its class plus (info, mode, size, palette, pixels), so what each one
needs to know travels in ``im.info``.
"""
from __future__ import annotations

import os
import signal
import threading

from PIL import Image

OWNER = "vlmlab_test_owner_pid"
MARKER = "vlmlab_test_marker"


def _make(cls, colour="gray", **info):
    im = Image.new("RGB", (16, 16), colour)
    im.__class__ = cls
    im.info.update(info)
    return im


class CrashingImage(Image.Image):
    """Kills the process that opens it (as a decoder segfault would), except the process that made it."""

    def load(self):
        if os.getpid() != self.info.get(OWNER):
            os._exit(3)
        return super().load()


class StopOnceImage(Image.Image):
    """The first process to open it stops itself (SIGSTOP, as a hung decoder or driver would look);
    every later opener sees a normal image. The marker file says whether it has happened."""

    def load(self):
        if os.getpid() != self.info.get(OWNER):
            try:
                fd = os.open(self.info[MARKER], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os.kill(os.getpid(), signal.SIGSTOP)
        return super().load()


class WaitingImage(Image.Image):
    """Blocks its opener until ``release()`` (in-process only), then fails to decode."""

    gates: dict = {}

    def load(self):
        gate = self.gates.get(self.info.get(MARKER))
        if gate is not None:
            gate.wait(60)
        raise OSError("image data is damaged (test image)")


def crashing(colour="gray"):
    return _make(CrashingImage, colour, **{OWNER: os.getpid()})


def stop_once(marker, colour="gray"):
    return _make(StopOnceImage, colour, **{OWNER: os.getpid(), MARKER: str(marker)})


def waiting(name="gate"):
    WaitingImage.gates[name] = threading.Event()
    return _make(WaitingImage, "gray", **{MARKER: name}), WaitingImage.gates[name]
