"""Forward hooks that time generation: one recorder per model, shared by nested profilers.

The recorder hooks the vision tower, the projector, decoder layers (every one, or the first and
last of each device's run) and the head, plus the model's own forward (one step of ``generate``),
and keeps CUDA events or host clock readings; see ``vlmlab.observe.profiler`` for what is timed and
what it costs. ``acquire``/``release`` install hooks once per model and remove them with the last user."""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field

from vlmlab.observe.sampler import device_key

STAGES = ("vision encode", "projector", "prefill", "decode")
COMPONENTS = ("vision", "projector", "layers", "head")
STEP_KINDS = ("prefill", "decode", "other")  # what a decoder layer / head call counts towards
DRAIN_EVERY = 64  # steps between resolutions of completed CUDA events
AUTO_LAYER_EVERY_CUDA = 1  # layer_every=None on CUDA: decode steps between timed ones (see Overhead above)


_RECORDERS: dict[int, "Recorder"] = {}  # id(root module) -> its installed hooks
_RECORDERS_LOCK = threading.Lock()


@dataclass
class Target:
    component: str  # vision | projector | layers | head
    name: str
    module: object
    device: object  # device_key
    layer: int | None = None  # index among the decoder layers
    nested: bool = False  # a projector inside the vision tower: not counted twice
    post_module: object = None  # detail="devices": the last layer of a run (the clock stops there)
    first: bool = True  # decoder layers: the first of a run of layers on one device ...
    last: bool = True  # ... and the last (only the last gets a post hook)
    cell: list = field(default_factory=lambda: [None, -1])  # [start mark, layer started]; shared by a run


class Recorder:
    """The hooks of one model and what they measured, shared by every profiler on that model."""

    def __init__(self, torch, root, targets: list[Target], layer_devices: list, detail: str, layer_every: int):
        self.torch = torch
        self.detail = detail
        self.layer_every = layer_every
        self.timing = True  # whether decoder layers are timed in this step
        self.steps_seen = [0, 0, 0]  # model forwards per kind ...
        self.steps_timed = [0, 0, 0]  # ... and those whose layers were timed
        self.root = root
        self.targets = targets
        self.layer_devices = layer_devices
        self.users = 0
        self.handles: list = []
        self.t0 = time.perf_counter()
        self.cuda_devices = sorted({t.device for t in targets if isinstance(t.device, int)})
        self.uses_cuda = bool(self.cuda_devices)
        self.refs: dict = {}  # CUDA index -> (reference event, host seconds since t0)
        # step state
        self.kind = 2  # index into STEP_KINDS of what runs now (2 = outside any model forward)
        self.step_id = 0
        self.step_depth = 0
        self._step_start = None
        self._step_meta = None
        # results (append-only lists and running sums: a window is the difference of two snapshots)
        n = len(layer_devices)
        self.layer_ms = [[0.0] * n for _ in STEP_KINDS]  # [kind][layer] -> ms
        self.calls = {c: [] for c in ("vision", "projector", "head")}  # (ms, step or None, kind, device, start_s, nested)
        self.steps: list = []  # (kind, start_s, end_s, ms, nested_ms, batch, step id)
        self.nested_ms: dict = collections.defaultdict(float)  # step id -> vision/projector ms inside it
        self.pending: collections.deque = collections.deque()  # unresolved CUDA records
        self.pools: dict = {}  # CUDA index -> resolved events, recorded again rather than created
        self.streams: dict = {}  # CUDA index -> its current stream, read at install and at each step

    # -- clock ------------------------------------------------------------------------------
    def _reference(self):
        torch = self.torch
        self._read_streams()
        for d in self.cuda_devices:
            torch.cuda.synchronize(d)
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(torch.cuda.current_stream(d))
            ev.synchronize()
            self.refs[d] = (ev, time.perf_counter() - self.t0)

    def _read_streams(self):
        current = self.torch.cuda.current_stream
        for d in self.cuda_devices:
            self.streams[d] = current(d)

    def _to_seconds(self, mark, device):
        if isinstance(mark, float):
            return mark - self.t0
        ref, host = self.refs[device]
        return host + ref.elapsed_time(mark) / 1e3

    def _free(self, mark, device):
        """A resolved event goes back to its device's pool, to be recorded again."""
        if not isinstance(mark, float):
            self.pools.setdefault(device, []).append(mark)

    # -- installation -----------------------------------------------------------------------
    def install(self):
        if self.uses_cuda:
            self._reference()
        try:
            self.handles.append(self.root.register_forward_pre_hook(self._step_pre, with_kwargs=True))
            self.handles.append(self.root.register_forward_hook(self._step_post))
            for t in self.targets:
                pre, post = self._hooks_for(t)
                self.handles.append(t.module.register_forward_pre_hook(pre))
                if post is not None:
                    post_module = t.post_module if t.post_module is not None else t.module
                    self.handles.append(post_module.register_forward_hook(post))
        except BaseException:
            self.remove()
            raise

    def remove(self):
        while self.handles:
            self.handles.pop().remove()
        self.pools.clear()  # events go now, not at some later garbage collection
        self.pending.clear()

    def _hooks_for(self, t: Target):
        torch = self.torch
        dev = t.device
        cell = [None]
        on_cuda = isinstance(dev, int)
        perf = time.perf_counter
        if on_cuda:
            Event, streams = torch.cuda.Event, self.streams
            pool = self.pools.setdefault(dev, [])

            def mark():  # an event from the pool of resolved ones, recorded on the device's stream
                ev = pool.pop() if pool else Event(enable_timing=True)
                ev.record(streams[dev])
                return ev
        if t.component == "layers":
            # One clock reading per layer: a layer's pre hook ends the previous layer of its run and
            # starts its own; the run's last layer alone has a post hook. cell = [mark, index started].
            acc_by_kind, cell, i, first = self.layer_ms, t.cell, t.layer, t.first
            if not on_cuda:
                def pre(mod, args):
                    if not self.timing:
                        return
                    now = perf()
                    if not first and cell[1] == i - 1:
                        acc_by_kind[self.kind][i - 1] += (now - cell[0]) * 1e3
                    cell[0], cell[1] = now, i

                def post(mod, args, out):
                    if cell[1] == i and self.timing:
                        acc_by_kind[self.kind][i] += (perf() - cell[0]) * 1e3
                    cell[1] = -1
            else:
                pending = self.pending

                def pre(mod, args):
                    if not self.timing:
                        return
                    ev = mark()
                    if not first and cell[1] == i - 1:  # the end event is the next record's start
                        pending.append(("layers", i - 1, self.kind, cell[0], ev, dev, False))
                    cell[0], cell[1] = ev, i

                def post(mod, args, out):
                    if cell[1] == i and self.timing:  # an end event of its own
                        pending.append(("layers", i, self.kind, cell[0], mark(), dev, True))
                    cell[0], cell[1] = None, -1
            return pre, (post if t.last else None)
        comp = t.component
        calls = self.calls[comp]
        nested = t.nested

        def pre(mod, args):
            cell[0] = mark() if on_cuda else perf()

        def post(mod, args, out):
            step = self.step_id if self.step_depth else None
            if on_cuda:
                self.pending.append((comp, nested, self.kind, cell[0], mark(), dev, step))
            else:
                start = cell[0]
                ms = (perf() - start) * 1e3
                calls.append((ms, step, self.kind, dev, start - self.t0, nested))
                if step is not None and comp != "head" and not nested:
                    self.nested_ms[step] += ms
        return pre, post

    # -- model forward = one generation step -------------------------------------------------
    def _step_pre(self, mod, args, kwargs):
        self.step_depth += 1
        if self.step_depth > 1:  # a forward calling itself: count the outer one only
            return None
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        shape = getattr(x, "shape", ())
        seq = shape[1] if len(shape) >= 2 else 1
        self.kind = kind = 0 if seq > 1 else 1
        self.step_id += 1
        self.steps_seen[kind] += 1
        self.timing = kind == 0 or self.steps_seen[1] % self.layer_every == 1 % self.layer_every
        if self.timing:
            self.steps_timed[kind] += 1
        if self.uses_cuda:
            self._read_streams()  # one read per step: a caller may run generate under torch.cuda.stream(...)
            if self.step_id % DRAIN_EVERY == 0:
                self.drain(block=False)
        dev = getattr(x, "device", None)
        dev = device_key(dev) if dev is not None else "cpu"
        self._step_meta = (self.kind, shape[0] if shape else 1, self.step_id, dev)
        self._step_start = self._mark(dev)
        return None

    def _step_post(self, mod, args, out):
        self.step_depth -= 1
        if self.step_depth:
            return None
        logits = getattr(out, "logits", None)
        if logits is None and isinstance(out, (tuple, list)) and out:
            logits = out[0]
        dev = getattr(logits, "device", None)
        kind, batch, step, start_dev = self._step_meta
        dev = device_key(dev) if dev is not None else start_dev
        end = self._mark(dev)
        self.kind = 2
        self.timing = True
        if isinstance(end, float) and isinstance(self._step_start, float):
            s, e = self._step_start - self.t0, end - self.t0
            self.steps.append((kind, s, e, (e - s) * 1e3, batch, step))
        else:
            self.pending.append(("step", (kind, batch, step), kind, self._step_start, end, (start_dev, dev), step))
        return None

    def _mark(self, dev):
        if isinstance(dev, int) and dev in self.refs:
            pool = self.pools.setdefault(dev, [])
            ev = pool.pop() if pool else self.torch.cuda.Event(enable_timing=True)
            ev.record(self.streams[dev])
            return ev
        return time.perf_counter()

    # -- resolution of CUDA events ----------------------------------------------------------
    def drain(self, block: bool):
        """Resolve recorded CUDA events: all of them (``block``: synchronises), or the ones whose
        end event has completed (no sync), oldest first."""
        if not self.pending:
            return
        if block:
            for d in self.cuda_devices:
                self.torch.cuda.synchronize(d)
        pending = self.pending
        while pending:
            rec = pending[0]
            if not block and not all(isinstance(m, float) or m.query() for m in (rec[3], rec[4])):
                break
            pending.popleft()
            self._resolve(rec)

    def _resolve(self, rec):
        what, info, kind, start, end, dev, step = rec
        if what == "step":
            k, batch, step_id = info
            s = self._to_seconds(start, dev[0])
            e = self._to_seconds(end, dev[1])
            self.steps.append((k, s, e, (e - s) * 1e3, batch, step_id))
            self._free(start, dev[0])
            self._free(end, dev[1])
            return
        if isinstance(start, float) or isinstance(end, float):
            s, e = self._to_seconds(start, dev), self._to_seconds(end, dev)
            ms = (e - s) * 1e3
        else:  # a duration needs one read, a place on the timeline (vision calls only) another
            ms = start.elapsed_time(end)
            s = self._to_seconds(start, dev) if what == "vision" else None
        self._free(start, dev)  # records resolve in order: no earlier record still needs it
        if what == "layers":
            self.layer_ms[kind][info] += ms
            if step:  # an end event of its own (otherwise it is the next record's start)
                self._free(end, dev)
            return
        self._free(end, dev)
        self.calls[what].append((ms, step, kind, dev, s, info))
        if step is not None and what != "head" and not info:
            self.nested_ms[step] += ms

    # -- windows ----------------------------------------------------------------------------
    def snapshot(self) -> dict:
        self.drain(block=True)
        return {"layer_ms": [list(row) for row in self.layer_ms], "seen": list(self.steps_seen),
                "timed": list(self.steps_timed),
                "calls": {c: len(v) for c, v in self.calls.items()},
                "steps": len(self.steps), "t": time.perf_counter() - self.t0}


def acquire(torch, root, targets, layer_devices, detail, layer_every) -> Recorder:
    with _RECORDERS_LOCK:
        rec = _RECORDERS.get(id(root))
        if rec is None or rec.root is not root:
            rec = Recorder(torch, root, targets, layer_devices, detail, layer_every)
            rec.install()
            _RECORDERS[id(root)] = rec
        rec.users += 1
        return rec


def release(rec: Recorder):
    with _RECORDERS_LOCK:
        rec.users -= 1
        if rec.users <= 0:
            rec.remove()
            if _RECORDERS.get(id(rec.root)) is rec:
                del _RECORDERS[id(rec.root)]


def active_hooks(model) -> int:
    """How many hooks vlmlab's profilers hold on ``model`` (a LoadedModel or nn.Module) now."""
    root = root_of(model)
    rec = _RECORDERS.get(id(root))
    return len(rec.handles) if rec is not None and rec.root is root else 0


def root_of(model):
    if hasattr(model, "plan") and hasattr(model, "model") and not hasattr(model, "register_forward_hook"):
        return model.model  # a LoadedModel
    return model
