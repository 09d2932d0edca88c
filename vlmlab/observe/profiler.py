"""What happened on each device: memory over time, latency per stage and per device.

- :class:`MemorySampler` (vlmlab.observe.sampler, re-exported here) samples device memory in a thread.
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

import time

from vlmlab.observe.hooks import AUTO_LAYER_EVERY_CUDA, STAGES, STEP_KINDS, Recorder, acquire, active_hooks, release, root_of  # noqa: F401  active_hooks re-exported
from vlmlab.observe.profile import Profile
from vlmlab.observe.sampler import MemorySampler, device_key, device_label, ordered_devices  # noqa: F401  MemorySampler re-exported
from vlmlab.observe.targets import hook_targets, role_devices, roles_of


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
        self.loaded = model if root_of(model) is not model else None
        self.module = root_of(model)
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
        self._rec: Recorder | None = None
        self._sampler: MemorySampler | None = None
        self._state = "new"  # new | active | done
        self._profile: Profile | None = None

    # -- context ----------------------------------------------------------------------------
    def __enter__(self):
        if self._state == "active":
            raise RuntimeError("this Profiler is already active; use a new Profiler to nest")
        import torch

        roles = self.roles if self.roles is not None else roles_of(self.module)
        placed = getattr(self.loaded, "devices", None) or role_devices(self.module, roles)
        detail = self.detail or auto_detail(placed)
        targets, layer_devices = hook_targets(self.module, roles, detail)
        if not targets:
            raise ValueError(f"no module to hook: the roles {roles} name none of this model's modules")
        self._devices = ordered_devices({t.device for t in targets} | {device_key(d) for d in placed})
        self._reset_peaks = False
        layer_every = self.layer_every
        if layer_every is None:
            layer_every = AUTO_LAYER_EVERY_CUDA if any(isinstance(t.device, int) for t in targets) else 1
        rec = acquire(torch, self.module, targets, layer_devices, detail, layer_every)
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
            release(rec)
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
            release(rec)
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
        profile = Profile(model=self.name, devices=list(self._devices), wall_s=self._wall,
                          images=self.images if self._counted else None, tokens=tokens,
                          stages=d["stages"], device_ms=d["device_ms"],
                          layer_ms=d["layer_ms"] if self.detail == "layers" else [], layer_devices=d["layer_devices"],
                          steps=d["steps"], samples=samples, peaks=peaks, predicted=predicted,
                          interval=self.interval if self.memory else None, detail=self.detail, notes=notes)
        profile.rates = _rates(profile, self.plan)
        return profile

    def __repr__(self):
        return f"Profiler({self.name}, {self._state})"


def _rates(profile, plan) -> dict:
    """Achieved prefill TFLOP/s and decode GB/s from the median stage times, for the plan's model:
    batch = images per generate call, prompt length from the plan's workload (its image tokens plus
    its prompt_tokens), a decode step attending over the prompt and half the new tokens (a dynamic
    cache grows). Empty without a plan, a count of images, or a prefill and a decode to time."""
    lat = profile.latency
    if plan is None or not profile.images or not profile.generate_calls or "prefill" not in lat:
        return {}
    spec = plan._spec()
    from vlmlab.observe.roofline import achieved

    batch = max(1, round(profile.images / profile.generate_calls))
    prompt = plan.workload.prefill_tokens(spec.dims)
    new_per_seq = (profile.tokens or 0) / profile.images
    gpu = next((plan.hardware.by_index(d) for d in profile.devices if isinstance(d, int)), None)
    decode_ms = lat.get("decode", {}).get("p50_ms")
    return {"batch": batch, "prompt_tokens": prompt,
            **achieved(spec, gpu, batch=batch, prompt_tokens=prompt, prefill_s=lat["prefill"]["p50_ms"] / 1000,
                       decode_step_s=decode_ms / 1000 if decode_ms else None,
                       kv_tokens=prompt + int(new_per_seq // 2), dtype=plan.dtype)}


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


def _window(rec: Recorder, before: dict, after: dict, t_enter: float) -> dict:
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
        add(dev, STEP_KINDS[kind], "head", ms)
    layer_ms = [0.0] * len(rec.layer_devices)
    for k, kind in enumerate(STEP_KINDS):
        seen, timed = after["seen"][k] - before["seen"][k], after["timed"][k] - before["timed"][k]
        scale = seen / timed if k == 1 and timed and seen > timed else 1.0  # sampled decode steps
        for i, dev in enumerate(rec.layer_devices):
            ms = (after["layer_ms"][k][i] - before["layer_ms"][k][i]) * scale
            if ms:
                layer_ms[i] += ms
                add(dev, kind, "layers", ms)
    steps = []
    for kind, s, e, ms, batch, step in rec.steps[before["steps"]:after["steps"]]:
        name = STEP_KINDS[kind]
        if name == "prefill":
            ms = max(ms - rec.nested_ms.get(step, 0.0), 0.0)
        stages[name].append(ms)
        steps.append({"stage": name, "start": s + shift, "end": e + shift, "ms": ms, "batch": batch})
    spans = [{"stage": "vision encode", "start": start + shift, "end": start + shift + ms / 1e3, "ms": ms, "batch": None}
             for ms, step, kind, dev, start, _ in vision_calls]
    return {"stages": stages, "device_ms": device_ms, "layer_ms": layer_ms,
            "layer_devices": list(rec.layer_devices), "steps": sorted(spans + steps, key=lambda r: r["start"])}
