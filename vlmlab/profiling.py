"""What happened on each device: memory over time, latency per stage and per device.

- :class:`MemorySampler` (vlmlab.sampler, re-exported here) samples device memory in a thread.
- :class:`Profiler` — a context manager around generation. It hooks the vision tower, the
  projector, every decoder layer and the LM head, plus the model's own forward (one *step* of
  ``generate``) and returns a :class:`Profile`::

      with Profiler(loaded_model, plan=loaded_model.plan) as prof:
          out = loaded_model.model.generate(**inputs, max_new_tokens=32)
          prof.count(n_images, n_new_tokens)
      profile = prof.result()

Stages
    ``vision encode``: each vision-tower forward (ms per call). ``projector``: each projector
    forward (ms per call; inside the vision stage when the projector is part of the tower, as
    Qwen2-VL's merger). ``prefill``: each model forward whose input holds more than one token
    (the first forward of a ``generate`` call), minus any vision/projector time nested in it, so
    stages add up (transformers >= 5.2 encodes images before the first forward anyway).
    ``decode``: each later forward (one new token per sequence): ms per decode step = per token.
Per device
    Forward time spent in hooked modules (vision tower, projector, decoder layers, head) on each
    device, split by component and by stage; the rest of a stage (embeddings, host overhead,
    cross-device copies, sampling) is reported as ``other``.
Timing
    On CPU ``time.perf_counter``. On CUDA the hooks record CUDA events on each device's current
    stream (no synchronize in the hot path; events are pooled and recorded again once read).
    Step and vision times are placed on the host's time axis through one reference event per
    device taken at start, so a step that starts on GPU0 and ends on GPU1 has a duration.
    Completed events are resolved every 64 steps (``Event.query``, no sync), so a long
    captioning run holds a bounded number of events; the profiler synchronises only when it
    starts and stops. Decoder layers need one clock reading each: a layer's pre hook ends the
    previous layer of its run and starts its own, and only the last layer of a run on one
    device has a post hook.
Nesting
    Hooks are installed once per model: a second (nested) profiler on the same model shares them
    and reports only its own window. Hooks are removed when the last profiler exits, exceptions
    included.
Overhead
    Measured by ``benchmarks/profiling_overhead.py`` (results in ``benchmarks/results/
    profiling_overhead.txt``). A hooked module call costs about 2 us of host time on a bare
    module (the hooks plus torch's slower call path for modules with hooks), a CUDA event record
    3 us; entering and leaving a Profiler 1-7 ms (the sampler thread's start, the final sync).
    On a 7B model in eager bf16 on an H200, hooking all 32 decoder layers cost 5% of a generate
    call even when timing only one decode step in four, so the hooked call path itself is the
    cost there: the default (``detail=None``) is ``"devices"`` on CUDA (+1 to +2%) and
    ``"layers"`` on the CPU (about +1%). Two knobs trade detail for cost:
    ``detail="devices"`` hooks only the first and last decoder layer of each device's run of
    layers (per-device times stay exact, per-layer times are lost), and ``layer_every=N`` times
    the decoder layers on one decode step in N only (every prefill is timed; decode layer times
    are scaled up by steps seen / steps timed, an estimate that holds because decode steps of
    one generate call do the same work). ``memory=False`` drops the sampler thread.
"""
from __future__ import annotations

import base64
import collections
import html
import io
import math
import threading
import time
import weakref
from dataclasses import dataclass, field

from .sampler import MemorySampler, device_key, device_label  # MemorySampler re-exported: the Profiler runs one

GiB = 1024**3
STAGES = ("vision encode", "projector", "prefill", "decode")
COMPONENTS = ("vision", "projector", "layers", "head")
_STEP_KINDS = ("prefill", "decode", "other")  # what a decoder layer / head call counts towards
_DRAIN_EVERY = 64  # steps between resolutions of completed CUDA events
AUTO_LAYER_EVERY_CUDA = 1  # layer_every=None on CUDA: decode steps between timed ones (see Overhead above)


# ---- hooks -------------------------------------------------------------------------------------

_RECORDERS: dict[int, "_Recorder"] = {}  # id(root module) -> its installed hooks
_RECORDERS_LOCK = threading.Lock()


@dataclass
class _Target:
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


class _Recorder:
    """The hooks of one model and what they measured, shared by every profiler on that model."""

    def __init__(self, torch, root, targets: list[_Target], layer_devices: list, detail: str, layer_every: int):
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
        self.kind = 2  # index into _STEP_KINDS of what runs now (2 = outside any model forward)
        self.step_id = 0
        self.step_depth = 0
        self._step_start = None
        self._step_meta = None
        # results (append-only lists and running sums: a window is the difference of two snapshots)
        n = len(layer_devices)
        self.layer_ms = [[0.0] * n for _ in _STEP_KINDS]  # [kind][layer] -> ms
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

    def _hooks_for(self, t: _Target):
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
            if self.step_id % _DRAIN_EVERY == 0:
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


def _acquire(torch, root, targets, layer_devices, detail, layer_every) -> _Recorder:
    with _RECORDERS_LOCK:
        rec = _RECORDERS.get(id(root))
        if rec is None or rec.root is not root:
            rec = _Recorder(torch, root, targets, layer_devices, detail, layer_every)
            rec.install()
            _RECORDERS[id(root)] = rec
        rec.users += 1
        return rec


def _release(rec: _Recorder):
    with _RECORDERS_LOCK:
        rec.users -= 1
        if rec.users <= 0:
            rec.remove()
            if _RECORDERS.get(id(rec.root)) is rec:
                del _RECORDERS[id(rec.root)]


def active_hooks(model) -> int:
    """How many hooks vlmlab's profilers hold on ``model`` (a LoadedModel or nn.Module) now."""
    root = _root_of(model)
    rec = _RECORDERS.get(id(root))
    return len(rec.handles) if rec is not None and rec.root is root else 0


def _root_of(model):
    if hasattr(model, "plan") and hasattr(model, "model") and not hasattr(model, "register_forward_hook"):
        return model.model  # a LoadedModel
    return model


# ---- profiler ----------------------------------------------------------------------------------

def auto_detail(devices) -> str:
    """``detail=None``: per-device hooks on CUDA (every layer hooked cost 5% of a 7B bf16 generate
    on an H200, first and last layer per device about 1%), every layer on the CPU (about 1%)."""
    return "devices" if any(isinstance(device_key(d), int) for d in devices) else "layers"


class Profiler:
    """Profile generation with ``model`` (a LoadedModel, or an nn.Module with ``roles``).

    ``plan``: compare measured peaks with its predicted memory (default: the LoadedModel's plan).
    ``roles``: role -> module names (as ``ModelSpec.roles``); found from the model's config by the
    family adapters when not given. ``interval``: memory sampling period (s); ``memory=False``
    turns the sampler off. ``detail``: ``"layers"`` hooks every decoder layer (per-layer and
    per-device times), ``"devices"`` only the first and last layer of each device's run of
    layers (per-device times only, fewer hooks); None (default): ``"devices"`` on CUDA, where
    hooking every layer of a 7B model cost 5% of a run, ``"layers"`` on the CPU (about 1%).

    ``layer_every``: time decoder layers on one decode step in N (None: every step, see the
    module's Overhead notes). ``name``: how the Profile names the model.

    ``count(images, new_tokens)`` adds work done (for throughput); ``result()`` -> :class:`Profile`.
    Hooks go when the ``with`` block ends, also on an exception; the sampler thread is not waited
    for (it ends by itself within ``interval``).
    """

    def __init__(self, model, *, plan=None, interval: float = 0.05, roles: dict | None = None,
                 memory: bool = True, detail: str | None = None, layer_every: int | None = None, name: str | None = None):
        if detail not in (None, "layers", "devices"):
            raise ValueError(f"detail must be 'layers', 'devices' or None (automatic), not {detail!r}")
        if layer_every is not None and (not isinstance(layer_every, int) or layer_every < 1):
            raise ValueError(f"layer_every must be a positive integer or None (automatic), not {layer_every!r}")
        self.layer_every = layer_every
        self.loaded = model if _root_of(model) is not model else None
        self.module = _root_of(model)
        if self.module is None:
            raise ValueError("this LoadedModel has been unloaded; load it again to profile it")
        self.plan = plan if plan is not None else getattr(self.loaded, "plan", None)
        self.interval = interval
        self.roles = roles
        self.memory = memory
        self.detail = detail
        self.name = name or getattr(self.loaded, "name", None) or type(self.module).__name__
        self.images = 0
        self.tokens = 0
        self._counted = False
        self._rec: _Recorder | None = None
        self._sampler: MemorySampler | None = None
        self._state = "new"  # new | active | done
        self._profile: Profile | None = None

    # -- context ----------------------------------------------------------------------------
    def __enter__(self):
        if self._state == "active":
            raise RuntimeError("this Profiler is already active; use a new Profiler to nest")
        import torch

        roles = self.roles if self.roles is not None else _roles_of(self.module)
        placed = getattr(self.loaded, "devices", None) or _role_devices(self.module, roles)
        detail = self.detail or auto_detail(placed)
        targets, layer_devices = _targets(self.module, roles, detail)
        if not targets:
            raise ValueError(f"no module to hook: the roles {roles} name none of this model's modules")
        self._devices = _ordered({t.device for t in targets} | {device_key(d) for d in placed})
        self._reset_peaks = False
        layer_every = self.layer_every
        if layer_every is None:
            layer_every = AUTO_LAYER_EVERY_CUDA if any(isinstance(t.device, int) for t in targets) else 1
        rec = _acquire(torch, self.module, targets, layer_devices, detail, layer_every)
        try:
            self._rec = rec
            self.detail = rec.detail  # a nested profiler uses the hooks already there
            self._layer_every = rec.layer_every
            self.images, self.tokens, self._counted = 0, 0, False
            self._sampler = None
            self.__dict__.pop("_data", None)  # a Profiler used again starts afresh
            cuda = [d for d in self._devices if isinstance(d, int)]
            if cuda and rec.users == 1:  # the outermost profiler owns torch's peak counters
                for d in cuda:
                    torch.cuda.reset_peak_memory_stats(d)
                self._reset_peaks = True
            self._before = rec.snapshot()
            self._t_enter = time.perf_counter()
            if self.memory:
                self._sampler = MemorySampler(self._devices, interval=self.interval, t0=self._t_enter).start()
        except BaseException:
            _release(rec)
            self._rec = None
            raise
        self._state = "active"
        self._profile = None
        return self

    def __exit__(self, *exc):
        if self._state != "active":
            return False
        try:
            self._finish()
        except Exception:
            if exc[0] is None:
                raise
            # the block's own exception is the one to see; this profile stays unfinished
        finally:
            self._state = "done"
            rec, self._rec = self._rec, None
            if self._sampler is not None:
                self._sampler.stop(join=False)  # no wait for a thread switch; the thread ends by itself
            _release(rec)
        return False

    def _finish(self):
        rec = self._rec
        self._after = rec.snapshot()
        self._wall = time.perf_counter() - self._t_enter
        self._torch_peaks = {}
        if self._reset_peaks:
            torch = rec.torch
            for d in (d for d in self._devices if isinstance(d, int)):
                self._torch_peaks[d] = {"max_allocated": int(torch.cuda.max_memory_allocated(d)),
                                        "max_reserved": int(torch.cuda.max_memory_reserved(d))}
        self._data = _window(rec, self._before, self._after, self._t_enter)

    @property
    def active(self) -> bool:
        return self._state == "active"

    def count(self, images: int = 0, new_tokens: int = 0):
        """Report work done inside the profiled region (adds up over calls)."""
        self.images += int(images)
        self.tokens += int(new_tokens)
        self._counted = True
        return self

    def count_rows(self, rows):
        """:meth:`count` from result rows: those without an error, and their ``n_tokens``."""
        good = [r for r in rows if not r.get("error")]
        return self.count(len(good), sum(r.get("n_tokens") or 0 for r in good))

    @property
    def started_at(self) -> float | None:
        """When the profiled window began, on ``time.perf_counter``: time 0 of the Profile."""
        return getattr(self, "_t_enter", None)

    def result(self) -> "Profile":
        """The :class:`Profile`; inside the ``with`` block, of everything so far (synchronises)."""
        if self._state == "new":
            raise RuntimeError("the Profiler has not run yet: use it as `with Profiler(model) as prof:`")
        if self._state == "active":
            self._finish()
            return self._build()
        if not hasattr(self, "_data"):
            raise RuntimeError("the profiled block failed before the profile could be finished")
        if self._profile is None:
            self._profile = self._build()
        return self._profile

    def _build(self) -> "Profile":
        d = self._data
        samples = self._sampler.samples() if self._sampler is not None else []
        peaks = self._sampler.peaks() if self._sampler is not None else {}
        for dev, tp in self._torch_peaks.items():
            peaks.setdefault(dev, {}).update(tp)
        notes = []
        tokens = self.tokens if self._counted else None
        if not self._counted:
            notes.append("count() was not called: throughput unknown")
        if self._torch_peaks == {} and any(isinstance(x, int) for x in self._devices):
            notes.append("nested profiler: torch peak counters belong to the outer one; peaks are from samples")
        if self.detail == "devices":
            notes.append("detail='devices': per-layer times are not measured")
        if self._layer_every > 1:
            notes.append(f"decoder layers timed on 1 decode step in {self._layer_every} (and on every prefill); "
                         f"their decode times are scaled up to all decode steps")
        predicted = _predicted(self.plan, self.loaded, self._devices) if self.plan is not None else {}
        return Profile(model=self.name, devices=list(self._devices), wall_s=self._wall,
                       images=self.images if self._counted else None, tokens=tokens,
                       stages=d["stages"], device_ms=d["device_ms"],
                       layer_ms=d["layer_ms"] if self.detail == "layers" else [], layer_devices=d["layer_devices"],
                       steps=d["steps"], samples=samples, peaks=peaks, predicted=predicted,
                       interval=self.interval if self.memory else None, detail=self.detail, notes=notes)

    def __repr__(self):
        return f"Profiler({self.name}, {self._state})"


def _ordered(devices) -> list:
    return sorted(devices, key=lambda d: (not isinstance(d, int), str(d) if not isinstance(d, int) else d))


def _role_devices(root, roles) -> set:
    """Devices of the modules that play a role (embeddings and norm included; the first parameter
    of each): where the model sits, without walking every parameter of a big model."""
    out = set()
    for names in roles.values():
        for n in names:
            mod = _submodule(root, n)
            if mod is not None:
                out.add(_module_device(mod))
    return out


def _submodule(root, name):
    try:
        return root.get_submodule(name)
    except AttributeError:  # a parameter (query_tokens, image_newline) or a name absent here
        return None


def _module_device(module):
    hook = getattr(module, "_hf_hook", None)
    ex = getattr(hook, "execution_device", None)
    if ex is not None:
        return device_key(ex)
    import itertools

    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.device.type != "meta":
            return device_key(t.device)
    return "cpu"


_ROLES_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _roles_of(module) -> dict:
    try:
        return _ROLES_CACHE[module]
    except (KeyError, TypeError):
        pass
    roles = _find_roles(module)
    try:
        _ROLES_CACHE[module] = roles
    except TypeError:
        pass
    return roles


def _find_roles(module) -> dict:
    from .families import family_for

    config = getattr(module, "config", None)
    if config is None:
        raise ValueError("this module has no config to find its vision tower and decoder layers by; "
                         "pass roles={'vision': [...], 'layers': [...], 'head': [...]} (as ModelSpec.roles)")
    names = {n for n, _ in module.named_modules() if n}
    names |= {n for n, _ in module.named_parameters(remove_duplicate=False)}
    return family_for(config, names).resolve(names)


def _targets(root, roles, detail) -> tuple[list[_Target], list]:
    found = {n: m for names in roles.values() for n in names if (m := _submodule(root, n)) is not None}
    targets: list[_Target] = []
    vision_names = [n for n in roles.get("vision", []) if n in found]
    for n in vision_names:
        targets.append(_Target("vision", n, found[n], _module_device(found[n])))
    for n in roles.get("projector", []):
        if n in found:  # some projector entries are parameters (query_tokens, image_newline)
            nested = any(n.startswith(v + ".") for v in vision_names)
            targets.append(_Target("projector", n, found[n], _module_device(found[n]), nested=nested))
    layers = []
    for n in roles.get("layers", []):
        if n not in found:
            continue
        for child, mod in found[n].named_children():
            if child.isdigit():
                layers.append((f"{n}.{child}", mod))
    layer_devices = [_module_device(mod) for _, mod in layers]
    i = 0
    while i < len(layers):  # runs of consecutive layers on one device
        j = i
        while j + 1 < len(layers) and layer_devices[j + 1] == layer_devices[i]:
            j += 1
        if detail == "layers":
            cell = [None, -1]
            for k in range(i, j + 1):
                targets.append(_Target("layers", layers[k][0], layers[k][1], layer_devices[k], layer=k,
                                       first=k == i, last=k == j, cell=cell))
        else:  # one clock over the whole run
            targets.append(_Target("layers", f"{layers[i][0]}..{layers[j][0]}", layers[i][1], layer_devices[i],
                                   layer=j, post_module=layers[j][1] if j > i else None))
        i = j + 1
    for n in roles.get("head", []):
        if n in found:
            targets.append(_Target("head", n, found[n], _module_device(found[n])))
    return targets, layer_devices


def _predicted(plan, loaded, devices) -> dict:
    """Device -> predicted peak bytes, for the devices this model uses."""
    indices = list(plan.memory)
    if loaded is not None:
        try:
            gpus = plan.replicas[getattr(loaded, "replica", 0)].gpus
        except (IndexError, AttributeError):
            gpus = []
        if gpus:
            indices = [i for i in indices if i in set(gpus)]
    out = {}
    for i in indices:
        g = plan.hardware.by_index(i) if getattr(plan, "hardware", None) is not None else None
        dev = g.device if g is not None else i
        if dev in devices:
            out[dev] = out.get(dev, 0.0) + float(sum(plan.memory[i].values()))
    return out


def _window(rec: _Recorder, before: dict, after: dict, t_enter: float) -> dict:
    """What happened between two snapshots, times relative to ``t_enter``."""
    shift = rec.t0 - t_enter
    stages = {s: [] for s in STAGES}
    device_ms: dict = {}

    def add(dev, stage, comp, ms):
        device_ms.setdefault(dev, {}).setdefault(stage, {}).setdefault(comp, 0.0)
        device_ms[dev][stage][comp] += ms

    vision_calls = rec.calls["vision"][before["calls"]["vision"]:after["calls"]["vision"]]
    proj_calls = rec.calls["projector"][before["calls"]["projector"]:after["calls"]["projector"]]
    head_calls = rec.calls["head"][before["calls"]["head"]:after["calls"]["head"]]
    for ms, step, kind, dev, start, _ in vision_calls:
        stages["vision encode"].append(ms)
        add(dev, "vision encode", "vision", ms)
    for ms, step, kind, dev, start, nested in proj_calls:
        stages["projector"].append(ms)
        if not nested:  # a projector inside the vision tower is already in the tower's time
            add(dev, "vision encode", "projector", ms)
    for ms, step, kind, dev, start, _ in head_calls:
        add(dev, _STEP_KINDS[kind], "head", ms)
    layer_ms = [0.0] * len(rec.layer_devices)
    for k, kind in enumerate(_STEP_KINDS):
        seen, timed = after["seen"][k] - before["seen"][k], after["timed"][k] - before["timed"][k]
        scale = seen / timed if k == 1 and timed and seen > timed else 1.0  # sampled decode steps
        for i, dev in enumerate(rec.layer_devices):
            ms = (after["layer_ms"][k][i] - before["layer_ms"][k][i]) * scale
            if ms:
                layer_ms[i] += ms
                add(dev, kind, "layers", ms)
    steps = []
    for kind, s, e, ms, batch, step in rec.steps[before["steps"]:after["steps"]]:
        name = _STEP_KINDS[kind]
        if name == "prefill":
            ms = max(ms - rec.nested_ms.get(step, 0.0), 0.0)
        stages[name].append(ms)
        steps.append({"stage": name, "start": s + shift, "end": e + shift, "ms": ms, "batch": batch})
    spans = [{"stage": "vision encode", "start": start + shift, "end": start + shift + ms / 1e3, "ms": ms, "batch": None}
             for ms, step, kind, dev, start, _ in vision_calls]
    return {"stages": stages, "device_ms": device_ms, "layer_ms": layer_ms,
            "layer_devices": list(rec.layer_devices), "steps": sorted(spans + steps, key=lambda r: r["start"])}


# ---- the result --------------------------------------------------------------------------------

def _percentile(values, q):
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _stats(values) -> dict:
    n = len(values)
    return {"calls": n, "mean_ms": sum(values) / n if n else None, "p50_ms": _percentile(values, 50),
            "p95_ms": _percentile(values, 95), "total_ms": float(sum(values))}


@dataclass
class Profile:
    """What one Profiler saw. Bytes and milliseconds; devices as device maps write them
    (CUDA index as int, ``"cpu"``); labels ("GPU0", "cpu") in ``to_dict`` and tables.

    ``stages``: stage -> ms per call (``decode``: per step, i.e. per new token of each sequence).
    ``device_ms``: device -> stage -> component -> ms of hooked forward time.
    ``layer_ms``: per decoder layer, ms (zeros with ``detail="devices"``).
    ``steps``: timeline of vision calls and model forwards (seconds since the profiler started).
    ``samples``: memory rows (see :class:`MemorySampler`), same time axis.
    ``peaks``: device -> maxima (allocated, reserved, nvml_used, rss; on CUDA also torch's
    max_allocated / max_reserved over the window). ``predicted``: device -> bytes from the plan.
    """

    model: str
    devices: list
    wall_s: float
    images: int | None
    tokens: int | None
    stages: dict
    device_ms: dict
    layer_ms: list
    layer_devices: list
    steps: list
    samples: list
    peaks: dict
    predicted: dict = field(default_factory=dict)
    interval: float | None = 0.05
    detail: str = "layers"
    notes: list = field(default_factory=list)
    replicas: list = field(default_factory=list)  # a run over worker processes: each worker's own Profile

    # -- numbers ----------------------------------------------------------------------------
    @property
    def latency(self) -> dict:
        """Stage -> {calls, mean_ms, p50_ms, p95_ms, total_ms} for stages that ran."""
        return {s: _stats(v) for s, v in self.stages.items() if v}

    @property
    def generate_calls(self) -> int:
        return len(self.stages.get("prefill", []))

    @property
    def images_per_s(self) -> float | None:
        return self.images / self.wall_s if self.images is not None and self.wall_s > 0 else None

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.wall_s if self.tokens is not None and self.wall_s > 0 else None

    def forward_ms(self) -> dict:
        """Device -> hooked forward ms in all (every stage and component)."""
        return {d: sum(ms for comps in stages.values() for ms in comps.values())
                for d, stages in self.device_ms.items()}

    def peak(self) -> dict:
        """Device -> measured peak bytes comparable with the plan's prediction: NVML used (it counts
        the CUDA context, as the prediction does) where available, else torch's max reserved, else
        the largest reserved sample; the process RSS for "cpu"."""
        out = {}
        for d in self.devices:
            p = self.peaks.get(d, {})
            for key in ("nvml_used", "max_reserved", "reserved", "rss"):
                if p.get(key) is not None:
                    out[d] = int(p[key])
                    break
        return out

    def peak_basis(self) -> dict:
        out = {}
        for d in self.devices:
            p = self.peaks.get(d, {})
            out[d] = next((k for k in ("nvml_used", "max_reserved", "reserved", "rss") if p.get(k) is not None), None)
        return out

    def error_pct(self) -> dict:
        """Device -> (measured - predicted) / predicted in %, where both are known."""
        measured = self.peak()
        return {d: 100.0 * (measured[d] - p) / p for d, p in self.predicted.items() if d in measured and p}

    # -- tables -----------------------------------------------------------------------------
    def to_pandas(self) -> dict:
        """A dict of DataFrames:

        - ``"memory"``: the samples, one row per (time, device): t, device, allocated, reserved,
          nvml_used, rss (bytes);
        - ``"calls"``: tidy per-call latencies: stage, call, ms;
        - ``"latency"``: per stage: calls, mean_ms, p50_ms, p95_ms, total_ms;
        - ``"devices"``: per device: forward_ms, ms per component, peak (and its basis), predicted,
          error_pct;
        - ``"layers"``: per decoder layer: device, ms;
        - ``"summary"``: one row: wall_s, images, tokens, images_per_s, tokens_per_s, generate_calls.
        """
        import pandas as pd

        memory = pd.DataFrame(self.samples, columns=list(MemorySampler.FIELDS))
        calls = pd.DataFrame([{"stage": s, "call": i, "ms": ms} for s, v in self.stages.items() for i, ms in enumerate(v)],
                             columns=["stage", "call", "ms"])
        latency = pd.DataFrame([{"stage": s, **st} for s, st in self.latency.items()],
                               columns=["stage", "calls", "mean_ms", "p50_ms", "p95_ms", "total_ms"]).set_index("stage")
        devices = pd.DataFrame(self._device_rows()).set_index("device") if self.devices else pd.DataFrame()
        layers = pd.DataFrame([{"layer": i, "device": device_label(d), "ms": ms}
                               for i, (d, ms) in enumerate(zip(self.layer_devices, self.layer_ms))],
                              columns=["layer", "device", "ms"])
        summary = pd.DataFrame([self._summary()])
        return {"memory": memory, "calls": calls, "latency": latency, "devices": devices, "layers": layers,
                "summary": summary}

    def _device_rows(self) -> list[dict]:
        fwd, peak, basis, err = self.forward_ms(), self.peak(), self.peak_basis(), self.error_pct()
        rows = []
        for d in self.devices:
            comps = {c: 0.0 for c in COMPONENTS}
            for stage in self.device_ms.get(d, {}).values():
                for c, ms in stage.items():
                    comps[c] += ms
            rows.append({"device": device_label(d), "forward_ms": fwd.get(d, 0.0),
                         **{f"{c}_ms": v for c, v in comps.items()}, "peak": peak.get(d), "peak_basis": basis.get(d),
                         "predicted": self.predicted.get(d), "error_pct": err.get(d)})
        return rows

    def _summary(self) -> dict:
        return {"model": self.model, "wall_s": self.wall_s, "images": self.images, "tokens": self.tokens,
                "images_per_s": self.images_per_s, "tokens_per_s": self.tokens_per_s,
                "generate_calls": self.generate_calls}

    def to_dict(self, samples: bool = True, calls: bool = True) -> dict:
        """Plain JSON-able data (device labels as keys). ``samples``/``calls``: include the memory
        samples and the per-call latencies (the bulky parts)."""
        out = {**self._summary(), "devices": [device_label(d) for d in self.devices], "detail": self.detail,
               "interval": self.interval, "latency": self.latency,
               "device_ms": {device_label(d): v for d, v in self.device_ms.items()},
               "forward_ms": {device_label(d): v for d, v in self.forward_ms().items()},
               "layers": [{"device": device_label(d), "ms": ms} for d, ms in zip(self.layer_devices, self.layer_ms)],
               "peak": {device_label(d): v for d, v in self.peak().items()},
               "peak_basis": {device_label(d): v for d, v in self.peak_basis().items()},
               "peaks": {device_label(d): v for d, v in self.peaks.items()},
               "predicted": {device_label(d): v for d, v in self.predicted.items()},
               "error_pct": {device_label(d): v for d, v in self.error_pct().items()},
               "notes": list(self.notes)}
        if self.replicas:
            out["replicas"] = [r.to_dict(samples=False, calls=False) for r in self.replicas]
        if calls:
            out["calls"] = {s: list(v) for s, v in self.stages.items()}
            out["steps"] = list(self.steps)
        if samples:
            out["samples"] = [{**r, "device": device_label(r["device"])} for r in self.samples]
        return _jsonable(out)

    # -- pictures ---------------------------------------------------------------------------
    def plot_memory(self, ax=None, figsize=(7, 3.5)):
        """Memory over time per device, the plan's prediction dotted, vision/prefill shaded."""
        from .plots import memory_timeline

        fig = memory_timeline(self.samples, ax=ax, figsize=figsize, predicted=self.predicted)
        ax = fig.axes[0] if ax is None else ax
        spans = [s for s in self.steps if s["stage"] in ("vision encode", "prefill")]
        if len(spans) <= 200:
            colours = {"vision encode": "#4c72b0", "prefill": "#55a868"}
            seen = set()
            for s in spans:
                label = None if s["stage"] in seen else s["stage"]
                seen.add(s["stage"])
                ax.axvspan(s["start"], max(s["end"], s["start"] + 1e-4), color=colours[s["stage"]], alpha=0.12,
                           lw=0, label=label)
            if spans:
                ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
        return fig

    def plot_latency(self, ax=None, figsize=(6, 3.5), per: str = "call"):
        from .plots import latency_breakdown

        return latency_breakdown(self, ax=ax, figsize=figsize, per=per)

    def __repr__(self):
        lat = ", ".join(f"{s} {st['p50_ms']:.2f} ms" for s, st in self.latency.items())
        tp = f", {self.tokens_per_s:.1f} tokens/s" if self.tokens_per_s is not None else ""
        return f"Profile({self.model}, {self.wall_s:.2f} s{tp}; p50 {lat or 'no stage ran'})"

    def _repr_html_(self):
        esc = html.escape

        def num(v, fmt="{:.2f}"):
            return "" if v is None else fmt.format(v)

        s = self._summary()
        head = (f"<b>{esc(self.model)}</b> — {s['wall_s']:.2f} s wall, {s['generate_calls']} generate call(s)"
                + (f", {s['images_per_s']:.2f} images/s" if s["images_per_s"] is not None else "")
                + (f", {s['tokens_per_s']:.1f} tokens/s" if s["tokens_per_s"] is not None else ""))
        lat = "".join(f"<tr><td>{esc(n)}</td><td>{st['calls']}</td><td>{num(st['mean_ms'])}</td><td>{num(st['p50_ms'])}</td>"
                      f"<td>{num(st['p95_ms'])}</td></tr>" for n, st in self.latency.items())
        lat_t = (f"<table><tr><th>stage</th><th>calls</th><th>mean ms</th><th>p50 ms</th><th>p95 ms</th></tr>{lat}</table>"
                 f"<small>decode: per token (one step)</small>")
        dev = "".join(f"<tr><td>{esc(r['device'])}</td><td>{r['forward_ms']:.1f}</td>"
                      f"<td>{num(r['peak'] / GiB if r['peak'] is not None else None)} GiB ({esc(str(r['peak_basis']))})</td>"
                      f"<td>{num(r['predicted'] / GiB if r['predicted'] is not None else None)}</td>"
                      f"<td>{num(r['error_pct'], '{:+.1f}%')}</td></tr>" for r in self._device_rows())
        dev_t = (f"<table><tr><th>device</th><th>forward ms</th><th>peak measured</th><th>predicted GiB</th>"
                 f"<th>error</th></tr>{dev}</table>")
        notes = "".join(f"<li>{esc(n)}</li>" for n in self.notes)
        return (f"<div class='vlmlab-profile'>{head}<div style='display:flex;gap:1em;align-items:flex-start'>"
                f"<div>{lat_t}</div><div>{dev_t}</div></div>"
                f"<div style='display:flex;gap:1em'>{_png(self.plot_memory(figsize=(5.5, 3)))}"
                f"{_png(self.plot_latency(figsize=(4.5, 3)))}</div>"
                f"{'<ul>' + notes + '</ul>' if notes else ''}</div>")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    return f"<img src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'/>"


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if x is None or isinstance(x, (str, int, bool)):
        return x
    if hasattr(x, "item"):  # numpy / torch scalars
        return _jsonable(x.item())
    return str(x)
