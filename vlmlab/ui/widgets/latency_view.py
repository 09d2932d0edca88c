"""Latency view: the latency plot of the last profiled run (``Profile.plot_latency()``)."""
from __future__ import annotations

import ipywidgets as w

from .common import message, png


class LatencyView:
    """Attributes: ``plot`` (Image), ``message`` (HTML), ``profile`` (the Profile shown), ``widget``."""

    def __init__(self):
        self.profile = None
        self.plot = w.Image(format="png", layout=w.Layout(max_width="720px"))
        self.message = w.HTML(message("No profiled run yet: tick 'profile' in the Caption tab and run."))
        self.widget = w.VBox([self.message, self.plot])
        self.widget.add_class("vlmlab-latency-view")  # stable hooks for CSS and browser tests

    def show(self, profile):
        """Show ``profile`` (a vlmlab.observe Profile, or a CaptionResult holding one)."""
        profile = getattr(profile, "profile", profile) if not hasattr(profile, "plot_latency") else profile
        if profile is None:
            return
        try:
            self.plot.value = png(profile.plot_latency())
        except Exception as err:  # noqa: BLE001 - a skin shows every failure to the user
            self.message.value = message(f"cannot plot the latency: {type(err).__name__}: {err}", "#c44e52")
            return
        self.profile = profile
        self.message.value = message(repr(profile))
