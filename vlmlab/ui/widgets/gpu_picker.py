"""GPU picker: this machine's GPUs (a row each: checkbox, name, free/total, utilisation) filtered by
free memory, the GPUs of a Ray cluster grouped by node, or a virtual box typed as text ("2x24GiB").
``picker.hardware`` is the selection."""
from __future__ import annotations

import ipywidgets as w

from .common import message

GiB = 1024**3
MACHINE, CLUSTER, VIRTUAL = "machine", "ray", "virtual"


class GpuPicker:
    """Attributes: ``source`` (ToggleButtons machine/ray/virtual), ``checks`` (a Checkbox per GPU),
    ``rows`` (VBox of GPU rows; on a cluster, a node heading above each node's rows), ``min_free``
    (FloatText, GiB), ``virtual`` (Text), ``address`` (Text: "ray", "ray://head:10001"),
    ``connect_button``, ``cluster`` (the cluster's Hardware once connected),
    ``refresh_button``, ``message`` (HTML: why there is no GPU), ``summary`` (HTML: the selection),
    ``widget`` (the panel)."""

    def __init__(self, machine=None, spec: str | None = None, on_change=None):
        import vlmlab

        self.machine = machine if machine is not None else vlmlab.gpus()
        self._callbacks = [on_change] if on_change else []
        self.source = w.ToggleButtons(options=[("this machine", MACHINE), ("Ray cluster", CLUSTER),
                                               ("virtual box", VIRTUAL)],
                                      value=VIRTUAL if spec or not self.machine else MACHINE)
        self.address = w.Text(value="ray", description="cluster", continuous_update=False,
                              placeholder="ray, ray://head:10001, ray:head:6379")
        self.connect_button = w.Button(description="Connect", icon="plug", tooltip="list the cluster's nodes and GPUs")
        self.cluster, self._cluster_error = None, ""
        self.virtual = w.Text(value=spec or "2x24GiB", description="virtual box",
                              placeholder="2x24GiB, a100-40gb, 4xh200, 2xcpu", continuous_update=False)
        self.min_free = w.FloatText(value=0.0, description="min free GiB", step=1.0)
        self.refresh_button = w.Button(description="Refresh", icon="refresh", tooltip="read the GPUs again")
        self.message = w.HTML()
        self.rows = w.VBox()
        self.checks: list[w.Checkbox] = []
        self.summary = w.HTML()
        self.cluster_bar = w.HBox([self.address, self.connect_button])
        self.widget = w.VBox([self.source, w.HBox([self.min_free, self.refresh_button]), self.cluster_bar,
                              self.message, self.rows, self.virtual, self.summary])
        self.widget.add_class("vlmlab-gpu-picker")  # stable hooks for CSS and browser tests
        for control in (self.virtual, self.min_free):
            control.observe(self._changed, names="value")
        self.source.observe(self._switched, names="value")
        self.refresh_button.on_click(lambda _: self.refresh())
        self.connect_button.on_click(lambda _: self.connect())
        self._build_rows()
        self._changed()

    # ---- state ---------------------------------------------------------------------------------
    @property
    def hardware(self):
        """The selected devices as a Hardware (raises ValueError for a bad virtual spec)."""
        import vlmlab

        min_free = self.min_free.value * GiB if self.min_free.value > 0 else None
        if self.source.value == VIRTUAL:
            hw = vlmlab.gpus(self.virtual.value)
            return hw.select(min_free=min_free) if min_free else hw
        listed = self.listed
        if listed is None:
            raise ValueError(self._cluster_error or "not connected to a Ray cluster: press Connect")
        if not listed:
            return listed
        chosen = [g.index for g, c in zip(listed, self.checks) if c.value]
        return listed.select(indices=chosen, min_free=min_free)

    @property
    def listed(self):
        """The devices shown as rows: this machine's, or the Ray cluster's (None before connecting)."""
        return self.cluster if self.source.value == CLUSTER else self.machine

    @property
    def runnable(self):
        """What a run can use: the selection if it is real (or CPU worker slots), else None (the API's default)."""
        try:
            hw = self.hardware
        except ValueError:
            return None
        return hw if hw and (not hw.virtual or hw.is_cpu) else None

    def on_change(self, callback):
        """Call ``callback(hardware_or_None)`` whenever the selection changes."""
        self._callbacks.append(callback)

    def refresh(self):
        """Read the listed GPUs again (free memory, utilisation), keeping the ticks."""
        import vlmlab

        if self.source.value == CLUSTER:
            return self.connect()
        ticked = {g.index for g, c in zip(self.machine, self.checks) if c.value}
        self.machine = vlmlab.gpus()
        self._build_rows(ticked)
        self._changed()

    def connect(self):
        """List the nodes and GPUs of the Ray cluster at ``address`` (connecting this kernel to it)."""
        import vlmlab

        try:
            self.cluster, self._cluster_error = vlmlab.gpus(self.address.value.strip() or "ray"), ""
        except Exception as err:  # noqa: BLE001 - no Ray, no cluster there, a bad address: say which
            self.cluster, self._cluster_error = None, f"{type(err).__name__}: {err}"
        self._build_rows()
        self._changed()

    # ---- rendering -----------------------------------------------------------------------------
    def _build_rows(self, ticked=None):
        for c in self.checks:
            c.unobserve(self._changed, names="value")
        listed = self.listed if self.listed is not None else []
        self.checks = [w.Checkbox(value=ticked is None or g.index in ticked, description=g.label, indent=False,
                                  layout=w.Layout(width="6em")) for g in listed]
        rows, node = [], None
        for g, check in zip(listed, self.checks):
            if g.node is not None and g.node != node:
                node = g.node
                rows.append(w.HTML(f"<b>node {g.node[:8]}</b> ({g.host})", layout=w.Layout(margin="4px 0 0 0")))
            util = "" if g.utilization is None else f"{g.utilization:.0f}% busy"
            rows.append(w.HBox([check, w.Label(g.name, layout=w.Layout(width="16em")),
                                w.Label(f"{g.free / GiB:.1f} / {g.total / GiB:.1f} GiB free",
                                        layout=w.Layout(width="12em")), w.Label(util)]))
            check.observe(self._changed, names="value")
        self.rows.children = rows
        if self.listed is None:
            self.message.value = message(self._cluster_error or "Connect to list the nodes and GPUs of a Ray cluster.",
                                         "#c44e52" if self._cluster_error else "#666")
        else:
            self.message.value = "" if listed else message(listed.message or "No GPU found.", "#c44e52")

    def _switched(self, _=None):
        self._build_rows()
        self._changed()

    def _changed(self, _=None):
        virtual = self.source.value == VIRTUAL
        self.virtual.layout.display = None if virtual else "none"
        self.rows.layout.display = "none" if virtual else None
        self.cluster_bar.layout.display = None if self.source.value == CLUSTER else "none"
        try:
            hw = self.hardware
        except ValueError as err:
            self.summary.value = message(str(err), "#c44e52")
            hw = None
        else:
            if hw:
                names = ", ".join(f"{g.label} {g.name} ({g.free / GiB:.1f} GiB free)" for g in hw)
                self.summary.value = message(f"selected {len(hw)} device(s): {names}")
            else:
                self.summary.value = message(hw.message or "no device selected", "#c44e52")
        for callback in self._callbacks:
            callback(hw)
