"""``vlmlab.plan()``: place a model on devices by strategy, predicting memory per device.

- ``single``: the whole model on the device with the most free memory.
- ``split``: consecutive units on consecutive devices, balanced by predicted *peak* (weights, KV
  cache, activations, context), the co-located input group kept whole. Makes a model fit; it is
  not faster, since one device works at a time.
- ``replicate``: one full copy per device (each in its own worker process at run time).
- ``hybrid``: replicas of split groups of ``gpus_per_replica`` devices.
- ``auto``: the fewest devices per replica that fit, replicated over the rest.

On a Ray cluster (``gpus("ray")``) every replica group sits inside one node.
"""
from __future__ import annotations

import dataclasses

from vlmlab.plan.devicemap import DeviceMapError, check, describe
from vlmlab.hardware import Hardware, fmt_bytes, gpus as get_gpus
from vlmlab.model.memory import DTYPES, DeviceLoad, Workload, canonical_dtype
from vlmlab.model.static_cache import keeps_static_cache
from vlmlab.plan.plan import STRATEGIES, Plan, Replica
from vlmlab.model.spec import ModelSpec, spec as get_spec

#: batch_size="auto": the share of each device's free memory the chosen batch leaves unused, for
#: what the memory model misses and for the allocator's fragmentation
AUTO_HEADROOM = 0.10
#: the largest batch "auto" picks: past a few hundred rows a 7B model's decode step reads more KV
#: cache than weights, so a larger batch buys little speed, and a padded last batch wastes more
AUTO_MAX_BATCH = 256
#: batch_size="auto" on CPU worker slots, where memory does not limit speed
AUTO_CPU_BATCH = 8


class PlanError(ValueError):
    """The model does not fit as asked; the message says how much is needed where and what would fit."""


def plan(model=None, gpus=None, strategy: str = "auto", dtype: str | None = None, batch_size: int = 1,
         max_new_tokens: int = 64, device_map: dict | None = None, gpus_per_replica: int | None = None,
         prompt_tokens: int = 16, trust_remote_code: bool = False, image_size=None, image_tokens: int | None = None,
         roles: dict | None = None) -> Plan:
    """Plan ``model`` (None = the bundled captioner) on ``gpus`` (None = this machine's GPUs, or the
    CPU when there are none; or a Hardware / a virtual spec such as ``"2x24GiB"``).

    ``batch_size="auto"``: the largest batch (up to ``AUTO_MAX_BATCH``, a multiple of 8 from 8 on)
    whose predicted peak leaves ``AUTO_HEADROOM`` of every used device's free memory unused, placed
    as ``strategy`` places batch 1; the plan's ``batch_note`` says how it was chosen.

    ``image_size`` (width, height): the images' size, which sets the image tokens of dynamic-resolution
    families (default: a 1024x768 photo); ``image_tokens``: tokens per image where the model's
    processor cannot count them; ``roles``: module names introspection cannot find."""
    auto = batch_size == "auto"
    if auto:
        batch_size = 1
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if gpus_per_replica is not None and strategy not in ("hybrid", "auto"):
        raise ValueError(f"gpus_per_replica applies to strategy 'hybrid' (or 'auto'), not {strategy!r}")
    for label, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens),
                         ("prompt_tokens", prompt_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    ms = get_spec(model, trust_remote_code=trust_remote_code, roles=roles).at(image_size, image_tokens)
    hw, warnings = _hardware(gpus)
    dtype = canonical_dtype(dtype if dtype is not None else ("float32" if hw.is_cpu else "bfloat16"))
    work = Workload(batch_size, max_new_tokens, prompt_tokens)
    if device_map is not None:
        if auto:
            raise ValueError("batch_size='auto' is chosen by a strategy's placement; with a device_map give a number")
        if ms.image_tokens_error:
            warnings = warnings + [f"image tokens unknown, memory counted without them: {ms.image_tokens_error}"]
        return _custom(ms, hw, device_map, work, dtype, warnings)
    if ms.image_tokens_error:
        from vlmlab.model.image_tokens import ImageTokensUnknown

        raise ImageTokensUnknown(f"{ms.name}: cannot plan without its image tokens per image; pass "
                                 f"plan(..., image_tokens=N) (a hand-written device_map is still checked). Why: "
                                 f"{ms.image_tokens_error}")
    if ms.image_tokens_source.startswith("model image path on meta"):
        warnings = warnings + [f"image tokens ({ms.dims.image_tokens} per image) counted by the {ms.image_tokens_source}"
                               f"; pass image_tokens=N if its processor makes more"]
    planner = _Planner(ms, hw, work, dtype)
    groups, strategy_used = planner.place(strategy, gpus_per_replica)
    note = None
    if auto:
        how = _placement(strategy_used, groups)
        batch, note = auto_batch(ms, hw, work, dtype, how, len(groups))
        planner = _Planner(ms, hw, Workload(batch, max_new_tokens, prompt_tokens), dtype)
        groups, strategy_used = planner.place(*how)
    p = planner.to_plan(groups, strategy_used, strategy, warnings + planner.warnings)
    p.batch_note = note
    return p


def _placement(strategy_used, groups) -> tuple[str, int | None]:
    """The (strategy, gpus_per_replica) that places a larger batch the way batch 1 was placed."""
    if strategy_used == "hybrid":
        return "hybrid", max(len(g) for g in groups)
    return strategy_used, None


def auto_batch(ms, hw, work, dtype, how=("single", None), replicas: int = 1) -> tuple[int, str]:
    """``(batch, note)``: the largest batch up to ``AUTO_MAX_BATCH`` that ``how`` (strategy,
    gpus_per_replica) still places as ``replicas`` replicas on ``hw`` with ``AUTO_HEADROOM`` of
    each device's free memory to spare; a multiple of 8 from 8 on (tensor-core friendly shapes)."""
    if hw.is_cpu:
        return AUTO_CPU_BATCH, f"batch {AUTO_CPU_BATCH}: the CPU default (memory does not limit speed there)"
    roomy = Hardware([dataclasses.replace(g, free=int(g.free * (1 - AUTO_HEADROOM))) for g in hw], hw.source)

    def fits(b):
        trial = _Planner(ms, roomy, Workload(b, work.max_new_tokens, work.prompt_tokens), dtype)
        try:
            groups, _ = trial.place(*how)
        except PlanError:
            return False
        return len(groups) >= replicas

    if not fits(1):
        return 1, f"batch 1: even one row leaves less than {AUTO_HEADROOM:.0%} of free memory unused"
    lo, hi = 1, AUTO_MAX_BATCH
    if fits(hi):
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    batch = lo - lo % 8 if lo >= 8 else lo
    limit = "the most vlmlab picks" if batch == AUTO_MAX_BATCH else f"the largest that leaves {AUTO_HEADROOM:.0%} of free memory unused"
    return batch, f"batch {batch}: {limit} (batch_size='auto')"


def _hardware(gpus) -> tuple[Hardware, list[str]]:
    if gpus is None:
        hw = get_gpus()
        if not hw:
            return get_gpus("cpu"), [f"{hw.message} Planned for the CPU."]
        return hw, []
    if isinstance(gpus, (list, tuple)) and all(isinstance(i, int) for i in gpus):
        return get_gpus().select(indices=list(gpus)), []
    hw = get_gpus(gpus)
    if not hw:
        raise ValueError("no devices to plan for: " + (hw.message or "the hardware is empty"))
    return hw, []


def _custom(ms, hw, device_map, work, dtype, warnings) -> Plan:
    if not isinstance(device_map, dict) or not device_map:
        raise TypeError("device_map must be a non-empty dict {module name: device}, e.g. {'': 0}")
    devices = {g.index: g for g in hw}
    memory, problems, more = check(ms, device_map, devices, work, dtype)
    if problems:
        raise DeviceMapError(problems)
    from vlmlab.plan.devicemap import normalise_device

    dm = {k: normalise_device(v) for k, v in device_map.items()}
    used = sorted({d for d in dm.values() if isinstance(d, int)})
    return Plan(ms.name, "custom", dtype, work, hw, [Replica(used, dm)], memory, warnings + more, [], "custom", ms)


class _Planner:
    def __init__(self, ms: ModelSpec, hw: Hardware, work: Workload, dtype: str):
        self.ms, self.hw, self.work, self.dtype = ms, hw, work, dtype
        self.devices = list(hw)
        self.warnings: list[str] = []
        self.static_cache = keeps_static_cache(ms, dtype)  # asked once: load() runs in the batch search

    def load(self, gpu) -> DeviceLoad:
        return DeviceLoad(self.ms.dims, self.work, self.dtype, is_cuda=gpu.kind != "cpu",
                          keeps_vision_states=self.ms.family.keeps_vision_states, static_cache=self.static_cache)

    def whole(self, gpu) -> float:
        load = self.load(gpu)
        for u in self.ms.units:
            load.add(u)
        return load.total()

    def split(self, group) -> list[list] | None:
        """Contiguous units over ``group``, minimising the fullest device's fraction; None if no fit."""
        units = self.ms.units

        def greedy(t):
            parts, i = [], 0
            for k, gpu in enumerate(group):
                load, part = self.load(gpu), []
                while i < len(units):
                    trial = load.copy().add(units[i])
                    if trial.total() > t * gpu.free:
                        break
                    load, part, i = trial, part + [units[i]], i + 1
                parts.append(part)
            return parts if i == len(units) else None

        if greedy(1.0) is None:
            return None
        lo, hi = 0.0, 1.0
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if greedy(mid) is not None else (mid, hi)
        return greedy(hi)

    def place(self, strategy, per_replica):
        n = len(self.devices)
        if strategy == "single":
            best = max(self.devices, key=lambda g: g.free)
            if self.whole(best) > best.free:
                raise PlanError(self.no_fit(f"on one device ({best.label}, {fmt_bytes(best.free)} free)", [best]))
            return [[(best, self.ms.units)]], "single"
        if strategy == "replicate":
            groups = [[(g, self.ms.units)] for g in self.devices if self.whole(g) <= g.free]
            if not groups:
                best = max(self.devices, key=lambda g: g.free)
                raise PlanError(self.no_fit(f"as a full replica on any device (largest: {best.label}, "
                                            f"{fmt_bytes(best.free)} free)", [best]))
            self._note_skipped(groups)
            return groups, "replicate" if len(groups) > 1 else "single"
        if strategy == "split":
            if len(self.hw.nodes()) > 1:
                raise ValueError(f"split keeps its one replica inside one node, and these devices are on "
                                 f"{len(self.hw.nodes())} nodes: use strategy='hybrid' (split replicas, one node "
                                 "each) or plan for one node's devices")
            parts = self.split(self.devices)
            if parts is None:
                raise PlanError(self.no_fit(f"split over all {n} device(s)", self.devices))
            return [self._group(self.devices, parts)], "split" if n > 1 else "single"
        if strategy == "hybrid" and per_replica is None:  # replicas of split groups: >= 2 GPUs each, >= 2 groups
            if n < 4:
                raise ValueError(f"hybrid needs at least 4 devices (2 replicas x 2 GPUs), got {n}; "
                                 "use strategy='split' or 'replicate'")
            sizes = range(2, n // 2 + 1)
        else:
            sizes = [per_replica] if per_replica is not None else range(1, n + 1)
        for k in sizes:
            if k < 1 or k > n:
                raise ValueError(f"gpus_per_replica must be between 1 and {n}, got {k}")
            groups = []
            for chunk in _chunks(self.hw, k):
                parts = self.split(chunk)
                if parts is not None:
                    groups.append(self._group(chunk, parts))
            if groups:
                self._note_skipped(groups)
                return groups, _name(len(groups), max(len(g) for g in groups))
        raise PlanError(self.no_fit(f"even split over all {n} device(s)", self.devices))

    def _group(self, chunk, parts):
        return [(gpu, part) for gpu, part in zip(chunk, parts) if part]

    def _note_skipped(self, groups):
        used = {gpu.index for group in groups for gpu, _ in group}
        idle = [g.label for g in self.devices if g.index not in used]
        if idle:
            self.warnings.append(f"{', '.join(idle)} not used: no whole replica group fits there")

    def to_plan(self, groups, strategy, requested, warnings) -> Plan:
        replicas, memory = [], {}
        for group in groups:
            dm = {}
            for gpu, part in group:
                load = self.load(gpu)
                for u in part:
                    load.add(u)
                    dm.update({m: gpu.device for m in u.members})
                memory[gpu.index] = load.breakdown()
            replicas.append(Replica([gpu.index for gpu, _ in group], dm))
        if strategy == "split":
            warnings = warnings + ["split makes the model fit, not faster: one device works at a time"]
        return Plan(self.ms.name, strategy, self.dtype, self.work, self.hw, replicas, dict(sorted(memory.items())),
                    warnings, [], requested, self.ms)

    def no_fit(self, where, devices) -> str:
        need = self.whole(devices[0])
        load = self.load(devices[0])
        for u in self.ms.units:
            load.add(u)
        lines = [f"{self.ms.name} in {self.dtype} at batch {self.work.batch_size} does not fit {where}: "
                 f"a full copy needs {fmt_bytes(need)} ({describe(load.breakdown())})."]
        lines += ["What would make it fit:"] + [f"  - {s}" for s in self.advice(devices)]
        return "\n".join(lines)

    def advice(self, devices) -> list[str]:
        out = []
        largest = max(self.hw, key=lambda g: g.free)
        order = list(DTYPES)
        for d in order[order.index(self.dtype) + 1:] if self.dtype in order else []:
            if d == "float16":
                continue
            alt = _Planner(self.ms, self.hw, self.work, d)
            if alt.whole(largest) <= largest.free:
                out.append(f"dtype={d!r}: {fmt_bytes(alt.whole(largest))} on one device")
                break
        b = self.work.batch_size // 2
        while b >= 1:
            alt = _Planner(self.ms, self.hw, Workload(b, self.work.max_new_tokens, self.work.prompt_tokens), self.dtype)
            if alt.whole(largest) <= largest.free:
                out.append(f"batch_size={b}: {fmt_bytes(alt.whole(largest))} on one device")
                break
            b //= 2
        if len(self.hw) > 1 and self.split(list(self.hw)) is not None:
            out.append(f"strategy='split' over {len(self.hw)} devices")
        elif len(self.hw) > 1:  # a lower dtype and a split together
            for d in (x for x in ("int8", "int4") if order.index(x) > order.index(self.dtype)):
                if _Planner(self.ms, self.hw, self.work, d).split(list(self.hw)) is not None:
                    out.append(f"dtype={d!r} with strategy='split' over {len(self.hw)} devices")
                    break
        per_device = max(g.free for g in self.hw)
        k = int(-(-self.whole(largest) // (per_device * 0.9)))
        out.append(f"more or larger GPUs: about {max(k, 2)} devices of {fmt_bytes(per_device)} with strategy='split'")
        return out


def _chunks(hw: Hardware, k: int):
    """Consecutive groups of ``k`` devices, each inside one node."""
    for devices in hw.nodes().values():
        for start in range(0, len(devices) - k + 1, k):
            yield devices[start:start + k]


def _name(replicas: int, per_replica: int) -> str:
    if per_replica == 1:
        return "replicate" if replicas > 1 else "single"
    return "hybrid" if replicas > 1 else "split"
