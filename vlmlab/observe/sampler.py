"""Device memory over time: :class:`MemorySampler`, a daemon thread sampling each device into a ring
buffer — for CUDA devices ``torch.cuda.memory_allocated/memory_reserved`` and NVML used memory, for
``"cpu"`` the process RSS (``/proc/self/statm``).

It never imports torch and never initialises CUDA: torch counters are read only when torch is
already imported *and* ``torch.cuda.is_initialized()``, so the dashboard's live monitor can run it in
a notebook kernel before worker processes are spawned. The Profiler (vlmlab.observe) runs one too.
"""
from __future__ import annotations

import collections
import os
import sys
import threading
import time
import weakref

try:
    _PAGE = os.sysconf("SC_PAGE_SIZE")
except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
    _PAGE = 4096


# ---- devices -----------------------------------------------------------------------------------

def device_key(device):
    """A device as vlmlab's device maps write it: CUDA index as an int, otherwise a string ("cpu").

    Accepts ints, "cpu", "cuda", "cuda:1", "GPU1", ``torch.device``."""
    if isinstance(device, bool):
        raise ValueError(f"{device!r} is not a device")
    if isinstance(device, int):
        return device
    kind = getattr(device, "type", None)
    if kind is not None:  # torch.device
        if kind == "cuda":
            return device.index if device.index is not None else _current_cuda_device()
        return kind
    text = str(device).strip().lower()
    for prefix in ("cuda:", "gpu"):
        if text.startswith(prefix) and text[len(prefix):].isdigit():
            return int(text[len(prefix):])
    if text.isdigit():
        return int(text)
    if text == "cuda":
        return _current_cuda_device()
    return text


def _current_cuda_device() -> int:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return torch.cuda.current_device()
    return 0


def device_label(device) -> str:
    return f"GPU{device}" if isinstance(device, int) else str(device)


def ordered_devices(devices) -> list:
    """CUDA indices first, in order, then named devices ("cpu", "cpu/r1")."""
    return sorted(devices, key=lambda d: (not isinstance(d, int), str(d) if not isinstance(d, int) else d))


_STATM: dict = {}  # pid -> an open descriptor of /proc/self/statm (read with pread: no open per sample)


def process_rss() -> int | None:
    """Resident set size of this process in bytes (Linux ``/proc/self/statm``), None elsewhere."""
    pid = os.getpid()
    try:
        fd = _STATM.get(pid)
        if fd is None:
            fd = _STATM[pid] = os.open("/proc/self/statm", os.O_RDONLY)
        return int(os.pread(fd, 128, 0).split()[1]) * _PAGE
    except (OSError, IndexError, ValueError, AttributeError):
        return None


# ---- memory sampler ----------------------------------------------------------------------------

class MemorySampler:
    """Sample memory of ``devices`` every ``interval`` seconds on a daemon thread.

    ``devices``: CUDA indices (ints, "cuda:1") and/or "cpu". The ring buffer keeps the last
    ``maxlen`` *ticks* (each tick has one row per device), so memory stays bounded however long
    it runs; running peaks per device (:meth:`peaks`) cover the whole run, evicted ticks included.

    Rows (:meth:`samples`) are dicts ``t`` (seconds since ``t0``, ``time.perf_counter`` based),
    ``device``, ``allocated``/``reserved`` (torch caching allocator, CUDA only, None when torch or
    CUDA is not initialised in this process), ``nvml_used`` (NVML, whole device, all processes;
    None without NVML) and ``rss`` (the "cpu" row only). Bytes throughout.
    """

    FIELDS = ("t", "device", "allocated", "reserved", "nvml_used", "rss")

    def __init__(self, devices=("cpu",), interval: float = 0.05, maxlen: int = 10_000, t0: float | None = None):
        if isinstance(devices, (str, int)) or not hasattr(devices, "__iter__"):
            devices = [devices]
        keys = []
        for d in devices:
            k = device_key(d)
            if k not in keys:
                keys.append(k)
        if not keys:
            raise ValueError("MemorySampler needs at least one device, e.g. [0, 1] or ['cpu']")
        if not interval > 0:
            raise ValueError(f"interval must be a positive number of seconds, not {interval!r}")
        if int(maxlen) < 1:
            raise ValueError(f"maxlen must be at least 1, not {maxlen!r}")
        self.devices = keys
        self.interval = float(interval)
        self.maxlen = int(maxlen)
        self.t0 = t0
        self.ticks = 0  # ticks taken in all, evicted ones included
        self.error: str | None = None  # the last exception a sample raised, if any
        self._buf: collections.deque = collections.deque(maxlen=self.maxlen)
        self._peaks: dict = {}
        self._lock = threading.Lock()
        self._paused = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._gen = 0  # bumped by start() and stop(): a thread samples while its generation is current
        self._active = False
        self._nvml = None  # pynvml module while initialised
        self._handles: dict = {}  # CUDA index -> NVML handle

    # -- control ----------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._active

    @property
    def paused(self) -> bool:
        return self._paused.is_set()

    def start(self) -> "MemorySampler":
        if self._active:
            return self
        if self.t0 is None:
            self.t0 = time.perf_counter()
        self._open_nvml()
        with self._lock:
            self._gen += 1
            self._active = True
        self._wake = threading.Event()
        self._thread = threading.Thread(target=_sampler_loop, args=(weakref.ref(self), self._gen, self._wake, self.interval),
                                        name="vlmlab-memory-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self, join: bool = True) -> "MemorySampler":
        """Stop sampling and take one last sample. ``join``: wake the thread and wait for it to
        end; ``join=False`` returns at once (no thread switch: what the Profiler does) and the
        thread, which samples no more, ends by itself within ``interval``."""
        if not self._active:
            return self
        with self._lock:
            self._gen += 1  # the thread's samples are refused from now on
            self._active = False
        thread, self._thread = self._thread, None
        if join and thread is not None:
            self._wake.set()
            thread.join(timeout=max(2.0, 10 * self.interval))
        if not self.paused:
            self._sample(None)
        self._close_nvml()
        return self

    def pause(self) -> "MemorySampler":
        self._paused.set()
        return self

    def resume(self) -> "MemorySampler":
        self._paused.clear()
        return self

    def clear(self):
        with self._lock:
            self._buf.clear()
            self._peaks.clear()
            self.ticks = 0

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    # -- sampling ---------------------------------------------------------------------------
    def sample(self) -> list[tuple]:
        """Take one tick now, from the calling thread; returns its rows as tuples."""
        return self._sample(None)

    def _sample(self, gen) -> list[tuple]:
        """One tick; ``gen``: the sampling thread's generation (its ticks are refused once stopped)."""
        try:
            rows = self._read()
        except Exception as err:  # noqa: BLE001 - the thread must survive a failed read
            self.error = f"{type(err).__name__}: {err}"
            return []
        with self._lock:
            if gen is not None and gen != self._gen:
                return []
            self._buf.append(rows)
            self.ticks += 1
            for row in rows:
                peak = self._peaks.setdefault(row[1], [None, None, None, None])
                for j, v in enumerate(row[2:]):
                    if v is not None and (peak[j] is None or v > peak[j]):
                        peak[j] = v
        return rows

    def _read(self) -> list[tuple]:
        t = time.perf_counter() - (self.t0 if self.t0 is not None else 0.0)
        torch = sys.modules.get("torch")  # never import torch here
        cuda = None
        if torch is not None:
            try:
                cuda = torch.cuda if torch.cuda.is_initialized() else None
            except AttributeError:  # a torch still being imported
                cuda = None
        rows = []
        for d in self.devices:
            if isinstance(d, int):
                alloc = reserved = used = None
                if cuda is not None:
                    alloc, reserved = _torch_counters(cuda, d)
                h = self._handles.get(d)
                if h is not None:
                    try:
                        used = int(self._nvml.nvmlDeviceGetMemoryInfo(h).used)
                    except Exception:  # noqa: BLE001
                        used = None
                rows.append((t, d, alloc, reserved, used, None))
            elif d == "cpu":
                rows.append((t, d, None, None, None, process_rss()))
            else:
                rows.append((t, d, None, None, None, None))
        return rows

    def _open_nvml(self):
        if any(isinstance(d, int) for d in self.devices):
            nv, handles = _nvml_handles()
            self._nvml = nv
            self._handles = {d: handles[d] for d in self.devices if isinstance(d, int) and d < len(handles)}

    def _close_nvml(self):  # NVML itself stays initialised for the process (see _nvml_handles)
        self._nvml, self._handles = None, {}

    # -- results ----------------------------------------------------------------------------
    def samples(self) -> list[dict]:
        with self._lock:
            ticks = list(self._buf)
        return [dict(zip(self.FIELDS, row)) for rows in ticks for row in rows]

    def latest(self) -> list[dict]:
        """The rows of the last tick (for a live monitor)."""
        with self._lock:
            rows = self._buf[-1] if self._buf else []
        return [dict(zip(self.FIELDS, row)) for row in rows]

    def peaks(self) -> dict:
        """Device -> {allocated, reserved, nvml_used, rss}: maxima over every tick taken."""
        with self._lock:
            return {d: dict(zip(self.FIELDS[2:], p)) for d, p in self._peaks.items()}

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame(self.samples(), columns=list(self.FIELDS))

    def __len__(self):
        with self._lock:
            return len(self._buf)

    def __repr__(self):
        state = "running" if self.running else "stopped"
        if self.running and self.paused:
            state = "paused"
        where = ", ".join(device_label(d) for d in self.devices)
        return f"MemorySampler({where}, every {self.interval * 1000:.0f} ms, {state}, {len(self)} ticks kept)"


def _torch_counters(cuda, d) -> tuple[int, int]:
    """(allocated, reserved) bytes of the caching allocator on CUDA device ``d``: one read of the
    nested stats (torch.cuda.memory_allocated and memory_reserved each flatten all ~100 stats)."""
    nested = getattr(cuda, "memory_stats_as_nested_dict", None)
    if nested is not None:
        stats = nested(d)
        try:
            return int(stats["allocated_bytes"]["all"]["current"]), int(stats["reserved_bytes"]["all"]["current"])
        except (KeyError, TypeError):
            pass
    return int(cuda.memory_allocated(d)), int(cuda.memory_reserved(d))


def _sampler_loop(ref, gen, wake, interval):
    """The sampling thread. It holds its sampler weakly: a sampler dropped without stop() ends it."""
    while True:
        sampler = ref()
        if sampler is None or sampler._gen != gen:
            return
        if not sampler._paused.is_set():
            sampler._sample(gen)
        del sampler
        if wake.wait(interval):
            return


_NVML_LOCK = threading.Lock()
_NVML: dict = {"module": None, "tried": False, "visible": None, "handles": []}


def _nvml_handles():
    """(pynvml, NVML handles in torch's device order), NVML initialised once per process and left
    initialised (nvmlInit is reference-counted and never touches CUDA); (None, []) without NVML."""
    with _NVML_LOCK:
        if not _NVML["tried"]:
            _NVML["tried"] = True
            try:
                import pynvml

                pynvml.nvmlInit()
                _NVML["module"] = pynvml
            except Exception:  # noqa: BLE001 - no driver, no NVML: torch counters only
                return None, []
        nv = _NVML["module"]
        if nv is None:
            return None, []
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if _NVML["visible"] != visible or not _NVML["handles"]:
            try:
                from vlmlab.hardware import _str, visible_nvml_indices

                all_handles = [nv.nvmlDeviceGetHandleByIndex(i) for i in range(nv.nvmlDeviceGetCount())]
                uuids = [_str(nv.nvmlDeviceGetUUID(h)) for h in all_handles]
                _NVML["handles"] = [all_handles[i] for i in visible_nvml_indices(visible, uuids)]
                _NVML["visible"] = visible
            except Exception:  # noqa: BLE001
                return None, []
        return nv, _NVML["handles"]
