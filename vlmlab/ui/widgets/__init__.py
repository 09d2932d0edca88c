"""The widget dashboard (ipywidgets 8): a skin over the API, one panel per module.

``vlmlab.dashboard()`` builds a :class:`Dashboard`; its panels are ``GpuPicker``,
``PlanEditor``, ``CaptionPanel``, ``MemoryMonitor`` and ``LatencyView``.

Stable CSS classes (for styling and browser tests): ``vlmlab-dashboard`` (the root),
``vlmlab-gpu-picker``, ``vlmlab-plan-editor``, ``vlmlab-plan-bars`` (the plan picture),
``vlmlab-caption-panel``, ``vlmlab-caption-gallery`` (holding the result's ``vlmlab-captions`` gallery),
``vlmlab-memory-monitor``, ``vlmlab-memory-plot``, ``vlmlab-latency-view``.
"""
from .caption_panel import CaptionPanel
from .dashboard import Dashboard, close_all, dashboard
from .gpu_picker import GpuPicker
from .latency_view import LatencyView
from .monitor import MemoryMonitor
from .plan_editor import PlanEditor

__all__ = ["Dashboard", "dashboard", "close_all", "GpuPicker", "PlanEditor", "CaptionPanel", "MemoryMonitor",
           "LatencyView"]
