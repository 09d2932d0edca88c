"""The Plan: where each replica of a model goes and how full each device will be.

A Plan is data (JSON round-trip), validates itself, renders as HTML and as a picture, and can be
edited (``move``) — an edit returns a new Plan whose ``problems`` say what the edit broke.
"""
from __future__ import annotations

import dataclasses
import html
import json
from dataclasses import dataclass, field

from vlmlab.plan.devicemap import DeviceMapError, check, describe, expand, normalise_device
from vlmlab.hardware import Gpu, Hardware, fmt_bytes
from vlmlab.model.memory import Workload


STRATEGIES = ("auto", "single", "split", "replicate", "hybrid")  # what plan() places by; a loaded plan may also be "custom"


@dataclass
class Replica:
    gpus: list[int]
    device_map: dict

    def to_dict(self):
        return {"gpus": list(self.gpus), "device_map": dict(self.device_map)}


@dataclass
class Plan:
    model: str
    strategy: str
    dtype: str
    workload: Workload
    hardware: Hardware
    replicas: list[Replica]
    memory: dict = field(default_factory=dict)  # device index -> {component: bytes}
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    requested: str | None = None
    spec: object = field(default=None, repr=False, compare=False)
    batch_note: str | None = None  # how batch_size="auto" chose the batch

    # ---- plain data ----------------------------------------------------------------------------
    @property
    def device_map(self) -> dict:
        """The first replica's accelerate-compatible device map."""
        return self.replicas[0].device_map

    @property
    def batch_size(self) -> int:
        return self.workload.batch_size

    @property
    def max_new_tokens(self) -> int:
        return self.workload.max_new_tokens

    @property
    def runs_in_workers(self) -> bool:
        """Whether a run goes to one worker per replica (several replicas, or the devices of a Ray
        cluster: the driver runs no model) rather than this process."""
        return len(self.replicas) > 1 or self.hardware.source == "ray"

    @property
    def ok(self) -> bool:
        return not self.problems

    def predicted(self, batch_size: int | None = None) -> dict[int, float]:
        """Predicted peak bytes per device index, at the plan's batch or at ``batch_size`` (the batch a
        run used, e.g. bench's evened-out one) on the same placement."""
        memory = self.memory if batch_size in (None, self.batch_size) else self._memory_at(batch_size)
        return {i: sum(b.values()) for i, b in memory.items()}

    def _memory_at(self, batch_size: int) -> dict:
        work = dataclasses.replace(self.workload, batch_size=batch_size)
        devices = {g.index: g for g in self.hardware}
        memory = {}
        for r in self.replicas:
            memory.update(check(self._spec(), r.device_map, devices, work, self.dtype)[0])
        return memory

    def headroom(self) -> dict[int, float]:
        return {i: self.hardware.by_index(i).free - sum(b.values()) for i, b in self.memory.items()}

    def validate(self) -> "Plan":
        if getattr(self, "_unchecked", False):  # read from JSON: the stored problems may be stale
            self.problems = self._recheck()
            self._unchecked = False
        if self.problems:
            raise DeviceMapError(self.problems)
        return self

    def to_dict(self) -> dict:
        return {"model": self.model, "strategy": self.strategy, "requested": self.requested, "dtype": self.dtype,
                "workload": vars(self.workload), "hardware": {"source": self.hardware.source, "devices": self.hardware.to_dicts(),
                             "address": self.hardware.address},
                "replicas": [r.to_dict() for r in self.replicas],
                "memory": {str(i): b for i, b in self.memory.items()}, "warnings": self.warnings, "problems": self.problems,
                **({"batch_note": self.batch_note} if self.batch_note else {})}

    def to_json(self, path=None, indent=2) -> str:
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    @classmethod
    def from_json(cls, text_or_path) -> "Plan":
        """Read a saved plan. The file may have been edited since it was saved: fields that make no plan
        raise ValueError here; the device maps are checked against the model again by :meth:`validate`
        (which ``load`` and ``caption`` call), so a map that would fail to load is refused first."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            with open(text) as f:
                text = f.read()
        d = json.loads(text)
        where = "" if str(text_or_path).lstrip().startswith("{") else f" in {text_or_path}"
        try:
            plan = cls._from_dict(d)
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"not a saved vlmlab plan{where}: {type(err).__name__}: {err}") from None
        plan._unchecked = True  # checked against the model by validate(), which load() and caption() call
        return plan

    @classmethod
    def _from_dict(cls, d: dict) -> "Plan":
        from vlmlab.model.memory import canonical_dtype

        if d["strategy"] not in (*STRATEGIES, "custom"):
            raise ValueError(f"unknown strategy {d['strategy']!r}; a plan's strategy is one of "
                             f"{', '.join(STRATEGIES)} or custom")
        work = Workload(**d["workload"])
        for label in ("batch_size", "max_new_tokens", "prompt_tokens", "images_per_prompt"):
            value = getattr(work, label)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"the plan's {label} must be a positive integer, got {value!r}")
        if not d["replicas"]:
            raise ValueError("the plan has no replica: it places the model nowhere")
        if not d["hardware"]["devices"]:
            raise ValueError("the plan has no device in its hardware")
        hw = Hardware([Gpu(**g) for g in d["hardware"]["devices"]], d["hardware"]["source"],
                      address=d["hardware"].get("address"))
        replicas = [Replica(list(r["gpus"]), dict(r["device_map"])) for r in d["replicas"]]
        return cls(d["model"], d["strategy"], canonical_dtype(d["dtype"]), work, hw, replicas,
                   {int(i): b for i, b in d["memory"].items()}, list(d["warnings"]), list(d["problems"]),
                   d.get("requested"), batch_note=d.get("batch_note"))

    def _recheck(self) -> list[str]:
        """The problems of every replica's device map, checked against the model and the devices (its
        warnings join the plan's)."""
        spec = self._spec()
        devices = {g.index: g for g in self.hardware}
        problems = []
        for i, r in enumerate(self.replicas):
            _, found, warned = check(spec, r.device_map, devices, self.workload, self.dtype)
            if not found:
                r.device_map = {k: normalise_device(v) for k, v in r.device_map.items()}
            prefix = f"replica {i}: " if len(self.replicas) > 1 else ""
            problems += [prefix + p for p in found]
            self.warnings = list(dict.fromkeys(self.warnings + [prefix + w for w in warned]))
        return problems

    def to_pandas(self):
        """Predicted bytes per device (rows) and component (columns), with capacity and total."""
        import pandas as pd

        rows = []
        for i, b in sorted(self.memory.items()):
            g = self.hardware.by_index(i)
            rows.append({"device": g.label, **b, "total": sum(b.values()), "capacity": g.free})
        return pd.DataFrame(rows).set_index("device")

    # ---- editing -------------------------------------------------------------------------------
    def move(self, modules=None, to=0, *, layers=None, replica: int = 0) -> "Plan":
        """A new Plan with ``modules`` (names) and/or decoder ``layers`` (indices) moved to device
        ``to`` in one replica; the result is re-checked and carries its problems."""
        spec = self._spec()
        names = list([modules] if isinstance(modules, str) else (modules or []))
        root = spec.roles["layers"][0]
        names += [f"{root}.{i}" for i in (layers or [])]
        if not names:
            raise ValueError("say what to move: module names, or layers=range(a, b)")
        target = normalise_device(to)
        dm = dict(self.replicas[replica].device_map)
        for n in names:
            dm = expand(spec, dm, n)
            dm[n] = target
        return self._with_map(replica, dm)

    def _with_map(self, replica: int, dm: dict) -> "Plan":
        spec = self._spec()
        devices = {g.index: g for g in self.hardware}
        memory, problems, warnings = check(spec, dm, devices, self.workload, self.dtype)
        replicas = [Replica(sorted({d for d in dm.values() if isinstance(d, int)}), dm) if i == replica else r
                    for i, r in enumerate(self.replicas)]
        # a device may now hold parts of several replicas (one worker process each): add them up
        merged: dict = {}
        for i, r in enumerate(replicas):
            mem = memory if i == replica else check(spec, r.device_map, devices, self.workload, self.dtype)[0]
            for d, b in mem.items():
                merged[d] = {k: merged.get(d, {}).get(k, 0.0) + v for k, v in b.items()}
        for d in sorted(merged):
            holders = [i for i, r in enumerate(replicas) if d in r.gpus]
            need, cap = sum(merged[d].values()), devices[d].free
            if len(holders) > 1 and need > cap:
                problems.append(f"{devices[d].label} is over capacity: replicas {holders} share it and need "
                                f"{fmt_bytes(need)} ({describe(merged[d])}) but it has {fmt_bytes(cap)}")
        return Plan(self.model, "custom" if len(replicas) == 1 else self.strategy, self.dtype, self.workload,
                    self.hardware, replicas, dict(sorted(merged.items())), warnings, problems, self.requested, spec)

    def _spec(self):
        if self.spec is None:
            from vlmlab.model.spec import spec as resolve

            self.spec = resolve(self.model)
        return self.spec

    # ---- display -------------------------------------------------------------------------------
    def summary(self) -> list[tuple[str, str]]:
        """(what, where) rows; contiguous runs of decoder layers on one device are grouped."""
        rows = []
        for r_i, r in enumerate(self.replicas):
            prefix = f"replica {r_i}: " if len(self.replicas) > 1 else ""
            run = None  # [first layer, last layer, where]
            for key, dev in r.device_map.items():
                where = self._label(dev) if isinstance(dev, int) else str(dev)
                if dev == "cpu" and self.hardware.is_cpu and len(r.gpus) == 1:
                    where = self._label(r.gpus[0])  # which CPU worker slot
                idx = _layer_index(key)
                if idx is not None and run and run[2] == where and run[1] == idx - 1:
                    run[1] = idx
                    continue
                if run:
                    rows.append(_layer_row(prefix, run))
                    run = None
                if idx is not None:
                    run = [idx, idx, where]
                else:
                    rows.append((prefix + key, where))
            if run:
                rows.append(_layer_row(prefix, run))
        return rows

    def __repr__(self):
        mem = ", ".join(f"{self._label(i)}: {fmt_bytes(t)}" for i, t in self.predicted().items())
        return (f"Plan({self.model}, {self.strategy}, {self.dtype}, batch {self.batch_size}, "
                f"{len(self.replicas)} replica(s), predicted {mem}{', PROBLEMS' if self.problems else ''})")

    def _repr_html_(self):
        esc = html.escape
        mem_rows = []
        for i, b in sorted(self.memory.items()):
            g = self.hardware.by_index(i)
            need = sum(b.values())
            colour = "#c44e52" if need > g.free else "#55a868"
            mem_rows.append(f"<tr><td>{g.label} ({esc(g.name)})</td><td style='color:{colour}'>{fmt_bytes(need)}</td>"
                            f"<td>{fmt_bytes(g.free)}</td><td>{esc(describe(b))}</td></tr>")
        map_rows = "".join(f"<tr><td><code>{esc(w)}</code></td><td>{esc(d)}</td></tr>" for w, d in self.summary())
        notes = "".join(f"<li style='color:#c44e52'>{esc(p)}</li>" for p in self.problems)
        notes += "".join(f"<li>{esc(w)}</li>" for w in self.warnings)
        notes += f"<li>{esc(self.batch_note)}</li>" if self.batch_note else ""
        groups = "; ".join(", ".join(self._label(g) for g in r.gpus) for r in self.replicas)
        return (f"<div class='vlmlab-plan'><b>{esc(self.model)}</b> — strategy <b>{self.strategy}</b>, {self.dtype}, "
                f"batch {self.batch_size}, {self.max_new_tokens} new tokens; replicas: {groups}"
                f"<div style='display:flex;gap:1em;align-items:flex-start'>"
                f"<table><tr><th>module</th><th>device</th></tr>{map_rows}</table>"
                f"<div><table><tr><th>device</th><th>predicted peak</th><th>available</th><th>breakdown</th></tr>"
                f"{''.join(mem_rows)}</table>{self._img_tag()}</div></div>"
                f"{'<ul>' + notes + '</ul>' if notes else ''}</div>")

    def _label(self, index) -> str:
        device = self.hardware.by_index(index)
        return device.label if device is not None else f"GPU{index}"

    def _img_tag(self):
        from vlmlab.figures import png_html

        return png_html(self.plot(figsize=(5, 3)))

    def plot(self, ax=None, figsize=(7, 4)):
        from vlmlab.plan.picture import plan_bars

        return plan_bars(self, ax=ax, figsize=figsize)

    def save_picture(self, path, dpi=120):
        fig = self.plot()
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
        return path


def _layer_index(key: str) -> int | None:
    parts = key.rsplit(".", 1)
    return int(parts[1]) if len(parts) == 2 and parts[1].isdigit() and parts[0].endswith("layers") else None


def _layer_row(prefix, run):
    first, last, where = run
    return (prefix + (f"layers {first}" if first == last else f"layers {first}–{last}"), where)
