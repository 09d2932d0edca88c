"""``vlmlab.dashboard()``: GPUs, plan editor, captioning, live memory and latency in one widget.

    board = vlmlab.dashboard()        # displays itself as a cell's value
    board.planner.plan                # the plan on screen
    board.close()                     # stops the monitor thread, closes the widgets
"""
from __future__ import annotations

import weakref

import ipywidgets as w

from .caption_panel import CaptionPanel
from .common import close_tree, message
from .gpu_picker import GpuPicker
from .latency_view import LatencyView
from .monitor import MemoryMonitor
from .plan_editor import PlanEditor

TABS = ("GPUs", "Plan", "Caption", "Monitor", "Latency")
_LIVE: "weakref.WeakSet[Dashboard]" = weakref.WeakSet()


class Dashboard:
    """The dashboard. Panels (each with its own ``.widget``): ``gpus`` (GpuPicker), ``planner``
    (PlanEditor), ``captioner`` (CaptionPanel), ``monitor`` (MemoryMonitor), ``latency``
    (LatencyView). ``tabs`` (Tab, in the order of TABS), ``header`` (HTML), ``widget`` (the root)."""

    def __init__(self, model=None, gpus=None, dtype=None, batch_size=None, poll_interval: float = 1.0,
                 images: str | None = None):
        from vlmlab.hardware import Hardware

        machine = gpus if isinstance(gpus, Hardware) else None
        self.gpus = GpuPicker(machine=machine, spec=gpus if isinstance(gpus, str) else None)
        if isinstance(gpus, (list, tuple)):
            for g, check in zip(self.gpus.machine, self.gpus.checks):
                check.value = g.index in gpus
        self.planner = PlanEditor(lambda: self.gpus.hardware, model=model, dtype=dtype, batch_size=batch_size)
        self.captioner = CaptionPanel(self._caption_settings, images=images if images is not None else _samples())
        self.monitor = MemoryMonitor(self._monitored, interval=poll_interval, predicted=self._predicted)
        self.latency = LatencyView()
        self.header = w.HTML()
        self.tabs = w.Tab(children=[self.gpus.widget, self.planner.widget, self.captioner.widget,
                                    self.monitor.widget, self.latency.widget], titles=TABS)
        self.widget = w.VBox([self.header, self.tabs], layout=w.Layout(width="100%"))
        self.widget.add_class("vlmlab-dashboard")
        self.gpus.on_change(lambda hw: self._update_header())
        self.planner.on_plan(lambda plan: self._update_header())
        self.captioner.on_result(self._on_result)
        self._update_header()
        _LIVE.add(self)

    # ---- wiring between panels -----------------------------------------------------------------
    def _caption_settings(self) -> dict:
        """What the Caption tab runs: the plan on screen if it can run here, else the model by name."""
        plan, run_on = self.planner.plan, self.gpus.runnable
        kwargs = {"batch_size": self.planner.batch_size.value}
        if plan is not None and plan.ok and run_on is not None and (not plan.hardware.virtual or plan.hardware.is_cpu):
            kwargs["model"] = plan
        else:
            dtype = self.planner.dtype.value
            kwargs.update(model=self.planner.model.value.strip() or None, gpus=run_on,
                          dtype=None if dtype == "auto" else dtype)
        return kwargs

    def _monitored(self) -> list:
        hw = self.gpus.runnable
        return [g.index for g in hw if g.kind == "cuda"] if hw else []

    def _predicted(self):
        """The plan's predicted peak per device, when the plan is for the devices being watched."""
        plan = self.planner.plan
        return plan.predicted() if plan is not None and not plan.hardware.virtual else None

    def _on_result(self, result):
        if getattr(result, "profile", None) is not None:
            self.latency.show(result.profile)

    def _update_header(self):
        try:
            hw = self.gpus.hardware
            where = f"{len(hw)} device(s), {hw.source}" if hw else "no device"
        except ValueError:
            where = "bad hardware spec"
        plan = self.planner.plan
        what = repr(plan) if plan is not None else "no plan yet"
        self.header.value = f"<b>vlmlab</b> · {message(where)} · {message(what)}"

    # ---- lifetime and display ------------------------------------------------------------------
    def close(self):
        """Stop the monitor thread, remove uploaded files, close every widget."""
        self.monitor.stop()
        self.captioner.close()
        close_tree(self.widget)
        _LIVE.discard(self)

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def __repr__(self):
        return f"Dashboard(tabs={list(TABS)}, plan={self.planner.plan!r}, monitor={'on' if self.monitor.running else 'off'})"


def _samples() -> str:
    from vlmlab.assets import SAMPLES_DIR

    folder = SAMPLES_DIR
    return str(folder) if folder.is_dir() else ""


def dashboard(model=None, gpus=None, dtype=None, batch_size=None, poll_interval: float = 1.0,
              images: str | None = None) -> Dashboard:
    """The widget dashboard: pick GPUs (``gpus``: a virtual spec such as "2x24GiB", GPU indices, or
    a Hardware), plan ``model`` and edit the plan, caption ``images`` (default: the bundled
    samples), watch memory live (sampled every ``poll_interval`` seconds) and the latency of a
    profiled run. Display the returned Dashboard (it is the cell's value); ``close()`` it when done."""
    return Dashboard(model=model, gpus=gpus, dtype=dtype, batch_size=batch_size, poll_interval=poll_interval,
                     images=images)


def close_all():
    """Close every open dashboard (``%unload_ext vlmlab`` does): no monitor thread is left running."""
    for board in list(_LIVE):
        board.close()
