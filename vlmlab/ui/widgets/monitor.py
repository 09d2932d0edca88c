"""Live memory monitor: ``vlmlab.MemorySampler`` samples per-device memory into its ring
buffer on its own thread; a second daemon thread redraws the plot every ``interval`` seconds, so
the kernel is never blocked. The sampler reads NVML (and torch's counters only if CUDA is already
initialised), or the process' RSS on a machine without GPUs: it never initialises CUDA."""
from __future__ import annotations

import threading

import ipywidgets as w

from .common import message, png


class MemoryMonitor:
    """Attributes: ``start_button``, ``pause_button`` (pause/resume), ``stop_button``, ``plot``
    (Image), ``status`` (HTML), ``sampler`` (the MemorySampler while running), ``widget``.
    ``devices`` is a callable returning the CUDA indices to sample (empty: the process' memory,
    "cpu"); ``predicted`` an optional callable returning {device: bytes} drawn as dotted lines."""

    def __init__(self, devices=None, interval: float = 1.0, window: int = 600, predicted=None):
        self._devices = devices or (lambda: [])
        self._predicted = predicted or (lambda: None)
        self.interval = float(interval)
        self.window = window  # samples kept per device (the sampler's ring buffer)
        self.sampler = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.start_button = w.Button(description="Start", icon="play", tooltip="start sampling memory")
        self.pause_button = w.Button(description="Pause", icon="pause", disabled=True)
        self.stop_button = w.Button(description="Stop", icon="stop", disabled=True)
        self.plot = w.Image(format="png", layout=w.Layout(max_width="720px"))
        self.status = w.HTML(message("stopped"))
        self.widget = w.VBox([w.HBox([self.start_button, self.pause_button, self.stop_button, self.status]),
                              self.plot])
        self.widget.add_class("vlmlab-memory-monitor")  # stable hooks for CSS and browser tests
        self.plot.add_class("vlmlab-memory-plot")
        self.start_button.on_click(lambda _: self.start())
        self.pause_button.on_click(lambda _: self.resume() if self.paused else self.pause())
        self.stop_button.on_click(lambda _: self.stop())

    # ---- state ---------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def paused(self) -> bool:
        return self.sampler is not None and bool(getattr(self.sampler, "paused", False))

    def samples(self):
        """The samples so far (the sampler's ``to_pandas()``), or None before the first start."""
        return None if self.sampler is None else self.sampler.to_pandas()

    # ---- control -------------------------------------------------------------------------------
    def start(self):
        from vlmlab.observe.sampler import MemorySampler

        with self._lock:
            if self.running:
                return
            self.sampler = MemorySampler(list(self._devices()) or ["cpu"], interval=self.interval, maxlen=self.window)
            self.sampler.start()
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="vlmlab-monitor", daemon=True)
            self._thread.start()
        self.start_button.disabled = True
        self.pause_button.disabled = self.stop_button.disabled = False
        self.pause_button.description, self.pause_button.icon = "Pause", "pause"
        self.status.value = message(f"sampling every {self.interval:g} s", "#2a7a2a")

    def pause(self):
        if self.sampler is not None and self.running:
            self.sampler.pause()
            self.pause_button.description, self.pause_button.icon = "Resume", "play"
            self.status.value = message("paused")

    def resume(self):
        if self.sampler is not None and self.running:
            self.sampler.resume()
            self.pause_button.description, self.pause_button.icon = "Pause", "pause"
            self.status.value = message(f"sampling every {self.interval:g} s", "#2a7a2a")

    def stop(self, timeout: float = 5.0):
        """Stop sampling and the redraw thread (joined: none is left behind)."""
        with self._lock:
            self._stop.set()
            thread, self._thread = self._thread, None
            if self.sampler is not None:
                self.sampler.stop()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self.start_button.disabled = False
        self.pause_button.disabled = self.stop_button.disabled = True
        if self.sampler is not None:
            self.redraw()
        self.status.value = message("stopped")

    # ---- drawing -------------------------------------------------------------------------------
    def _loop(self):
        while not self._stop.wait(self.interval):
            try:
                self.redraw()
            except Exception as err:  # noqa: BLE001 - keep the thread alive, say what went wrong
                self.status.value = message(f"monitor: {type(err).__name__}: {err}", "#c44e52")

    def redraw(self):
        from vlmlab.observe.plots import memory_timeline

        df = self.samples()
        if df is None or len(df) == 0:
            return
        self.plot.value = png(memory_timeline(df, figsize=(7, 3), predicted=self._predicted()))
