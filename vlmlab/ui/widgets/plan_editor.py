"""Plan view and editor: pick model, strategy, dtype and batch size, press Plan, see the per-GPU
stacked bars; move decoder layers a..b or a named module to another GPU (``Plan.move``) and see
what the edit broke (the new plan's problems) before anything is loaded."""
from __future__ import annotations

import html

import ipywidgets as w

from .common import message, notes, png

STRATEGIES = ("auto", "single", "split", "replicate", "hybrid")
DTYPES = [("auto", "auto"),  # "auto": leave dtype to the API (a None value would show a blank dropdown)
          ("bfloat16", "bfloat16"), ("float16", "float16"), ("float32", "float32"),
          ("int8", "int8"), ("int4", "int4")]


def model_names() -> list[str]:
    from vlmlab.model import catalog
    from vlmlab.model.spec import DEFAULT_MODEL

    return [DEFAULT_MODEL] + catalog.names()


class PlanEditor:
    """Attributes: ``model`` (Combobox, free text allowed), ``strategy``, ``dtype`` (Dropdowns),
    ``batch_size`` (BoundedIntText, default 8 as vlmlab.caption; also the Caption tab's batch size),
    ``max_new_tokens`` (BoundedIntText), ``plan_button``, ``bars`` (Image: the
    per-device stacked bars), ``table`` (HTML: what sits where), ``notes`` (HTML: problems in
    red, warnings), move controls ``layers_first``, ``layers_last``, ``layers_to``,
    ``move_layers_button``, ``module``, ``module_to``, ``move_module_button``; ``plan`` (the
    current Plan or None), ``widget``. ``hardware`` is a callable returning the GPUs to plan for."""

    def __init__(self, hardware, model: str | None = None, dtype: str | None = None, batch_size: int | None = None):
        self._hardware = hardware
        self.plan = None
        self._callbacks = []
        names = model_names()
        self.model = w.Combobox(options=names, value=model or names[0], description="model", ensure_option=False,
                                placeholder="catalogue name, folder or Hub id", layout=w.Layout(width="28em"))
        self.strategy = w.Dropdown(options=STRATEGIES, value="auto", description="strategy")
        self.dtype = w.Dropdown(options=DTYPES, value=dtype if dtype in dict(DTYPES).values() else "auto",
                                description="dtype")
        self.batch_size = w.BoundedIntText(value=batch_size or 8, min=1, max=65536, description="batch size")
        self.max_new_tokens = w.BoundedIntText(value=64, min=1, max=65536, description="new tokens")
        self.plan_button = w.Button(description="Plan", button_style="primary", icon="sitemap")
        self.bars = w.Image(format="png", layout=w.Layout(max_width="640px"))
        self.table = w.HTML()
        self.notes = w.HTML()
        self.layers_first = w.BoundedIntText(value=0, min=0, max=100000, description="layers", layout=w.Layout(width="11em"))
        self.layers_last = w.BoundedIntText(value=0, min=0, max=100000, description="to", layout=w.Layout(width="8em"),
                                            style={"description_width": "2em"})
        self.layers_to = w.Dropdown(options=[], description="→", layout=w.Layout(width="12em"),
                                    style={"description_width": "2em"})
        self.move_layers_button = w.Button(description="Move layers", icon="arrows-h", disabled=True)
        self.module = w.Combobox(options=[], description="module", ensure_option=False, layout=w.Layout(width="28em"),
                                 placeholder="e.g. model.vision_tower")
        self.module_to = w.Dropdown(options=[], description="→", layout=w.Layout(width="12em"),
                                    style={"description_width": "2em"})
        self.move_module_button = w.Button(description="Move module", icon="arrows-h", disabled=True)
        self.widget = w.VBox([
            w.HBox([self.model, self.strategy]), w.HBox([self.dtype, self.batch_size, self.max_new_tokens]),
            self.plan_button, self.notes, w.HBox([self.bars, self.table]),
            w.HTML("<b>Edit the plan</b> (layers first..last inclusive)"),
            w.HBox([self.layers_first, self.layers_last, self.layers_to, self.move_layers_button]),
            w.HBox([self.module, self.module_to, self.move_module_button])])
        self.widget.add_class("vlmlab-plan-editor")  # stable hooks for CSS and browser tests
        self.bars.add_class("vlmlab-plan-bars")
        self.plan_button.on_click(lambda _: self.make_plan())
        self.move_layers_button.on_click(lambda _: self.move_layers())
        self.move_module_button.on_click(lambda _: self.move_module())

    def on_plan(self, callback):
        """Call ``callback(plan)`` whenever a new plan (or edit) is shown."""
        self._callbacks.append(callback)

    # ---- actions (what the buttons do) ---------------------------------------------------------
    def make_plan(self):
        """Plan with the current settings (``vlmlab.plan``) and show it; errors go to ``notes``."""
        import vlmlab

        kwargs = dict(strategy=self.strategy.value, batch_size=self.batch_size.value,
                      max_new_tokens=self.max_new_tokens.value)
        if self.dtype.value != "auto":
            kwargs["dtype"] = self.dtype.value
        self.notes.value = message("planning…")
        try:
            plan = vlmlab.plan(self.model.value.strip() or None, gpus=self._hardware(), **kwargs)
        except Exception as err:  # noqa: BLE001 - a skin shows every failure to the user
            self.notes.value = notes(error=f"{type(err).__name__}: {err}")
            return None
        self.show(plan)
        return plan

    def move_layers(self):
        if self.plan is None:
            self.notes.value = notes(error="make a plan first")
            return None
        first, last = self.layers_first.value, self.layers_last.value
        if last < first:
            self.notes.value = notes(error=f"layers {first}..{last}: the last layer comes before the first")
            return None
        return self._edit(lambda p: p.move(layers=range(first, last + 1), to=self.layers_to.value))

    def move_module(self):
        if self.plan is None:
            self.notes.value = notes(error="make a plan first")
            return None
        name = self.module.value.strip()
        if not name:
            self.notes.value = notes(error="which module? type its name, e.g. one listed in the table")
            return None
        return self._edit(lambda p: p.move(name, to=self.module_to.value))

    def _edit(self, change):
        try:
            plan = change(self.plan)
        except Exception as err:  # noqa: BLE001
            self.notes.value = notes(error=f"{type(err).__name__}: {err}")
            return None
        self.show(plan)
        return plan

    # ---- display -------------------------------------------------------------------------------
    def show(self, plan):
        """Show ``plan``: bars, placement table, problems and warnings; update the move controls."""
        self.plan = plan
        self.bars.value = png(plan.plot(figsize=(6, 3.5)))
        self.table.value = _table(plan)
        status = (message(f"{len(plan.problems)} problem(s): this plan would fail", "#c44e52") if plan.problems
                  else message(f"ok: {plan!r}", "#2a7a2a"))
        self.notes.value = status + notes(plan.problems, plan.warnings)
        devices = [(g.label, g.device) for g in plan.hardware]
        for dropdown in (self.layers_to, self.module_to):
            keep = dropdown.value
            dropdown.options = devices
            dropdown.value = keep if keep in dict(devices).values() else devices[-1][1]
        self.module.options = tuple(k for k in plan.device_map if k)
        layers = _layer_count(plan)
        self.layers_first.max = self.layers_last.max = max(layers - 1, 0)
        self.move_layers_button.disabled = layers == 0
        self.move_module_button.disabled = False
        for callback in self._callbacks:
            callback(plan)


def _layer_count(plan) -> int:
    try:
        spec = plan._spec()
        return int(spec.dims.layers)
    except Exception:  # noqa: BLE001 - an unknown model: no layer controls
        return 0


def _table(plan) -> str:
    esc = html.escape
    rows = "".join(f"<tr><td><code>{esc(what)}</code></td><td>{esc(where)}</td></tr>" for what, where in plan.summary())
    mem = []
    for i, need in plan.predicted().items():
        g = plan.hardware.by_index(i)
        colour = "#c44e52" if need > g.free else "#2a7a2a"
        mem.append(f"<tr><td>{esc(g.label)}</td><td style='color:{colour}'>{need / 1024**3:.1f} GiB</td>"
                   f"<td>{g.free / 1024**3:.1f} GiB</td></tr>")
    return (f"<table class='vlmlab-placement'><tr><th>module</th><th>device</th></tr>{rows}</table>"
            f"<table class='vlmlab-memory'><tr><th>device</th><th>predicted</th><th>available</th></tr>"
            f"{''.join(mem)}</table>")
