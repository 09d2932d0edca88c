"""Device maps: check one before anything loads, and predict the memory it puts on each device.

A device map is accelerate's ``{module_or_parameter_name: device}``; ``""`` names the whole model.
Devices are GPU indices (``0``, ``"cuda:1"``), or ``"cpu"`` / ``"disk"`` for offloading.
"""
from __future__ import annotations

import difflib

from vlmlab.hardware import fmt_bytes
from vlmlab.model.memory import DeviceLoad, Workload
from vlmlab.model.static_cache import keeps_static_cache
from vlmlab.model.spec import ModelSpec, Unit

OFFLOAD = ("cpu", "disk")


class DeviceMapError(ValueError):
    """A device map that would fail at load or run time; ``problems`` lists each reason."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("the device map is not valid:\n" + "\n".join(f"  - {p}" for p in self.problems))


def normalise_device(value):
    """0, "0", "cuda:0" -> 0; "cpu"/"disk"/"meta" stay strings."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a device")
    if isinstance(value, int):
        return value
    text = str(value).strip().lower()
    if text.startswith("cuda:"):
        text = text[5:]
    if text.isdigit():
        return int(text)
    if text in OFFLOAD or text == "cuda":
        return 0 if text == "cuda" else text
    raise ValueError(f"{value!r} is not a device; use a GPU index (0, 'cuda:1'), 'cpu' or 'disk'")


def owner_of(name: str, device_map: dict) -> str | None:
    """The device-map key that places parameter ``name`` (the longest key that is a prefix)."""
    if "" in device_map and not any(name == k or name.startswith(k + ".") for k in device_map if k):
        return ""
    parts = name.split(".")
    for j in range(len(parts), 0, -1):
        key = ".".join(parts[:j])
        if key in device_map:
            return key
    return None


def expand(spec: ModelSpec, device_map: dict, name: str) -> dict:
    """Split the key that covers ``name`` into its children until ``name`` is a key itself."""
    dm = dict(device_map)
    if name in dm:
        return dm
    modules = dict(spec.modules.named_modules())
    while name not in dm:
        key = owner_of(name, dm)
        if key is None:
            raise KeyError(f"{name!r} is not covered by the device map")
        device = dm.pop(key)
        mod = modules[key]
        prefix = f"{key}." if key else ""
        for child, _ in mod.named_children():
            dm[prefix + child] = device
        for pname, _ in mod.named_parameters(recurse=False):
            dm[prefix + pname] = device
        for bname, _ in mod.named_buffers(recurse=False):
            dm[prefix + bname] = device
    return dm


def check(spec: ModelSpec, device_map: dict, devices: dict, work: Workload, dtype: str) -> tuple[dict, list[str], list[str]]:
    """Validate ``device_map`` against the model and the devices ``{index: Gpu}``.

    Returns (memory per device index, problems, warnings). Problems make loading fail or OOM;
    warnings do not.
    """
    problems, warnings = [], []
    names = spec.module_names() | {""}
    dm = {}
    for key, value in device_map.items():
        if key not in names:
            close = difflib.get_close_matches(key, sorted(names - {""}), n=1)
            hint = f" — did you mean {close[0]!r}?" if close else ""
            problems.append(f"unknown module {key!r}: {spec.name} has no module or parameter of that name{hint}")
            continue
        try:
            device = normalise_device(value)
        except ValueError as err:
            problems.append(f"{key!r}: {err}")
            continue
        if isinstance(device, int) and device not in devices:
            problems.append(f"{key!r} is mapped to GPU {device}, which does not exist; "
                            f"the devices are {sorted(devices)}")
            continue
        dm[key] = device
    keys = sorted(dm, key=len)
    for i, outer in enumerate(keys):
        for inner in keys[i + 1:]:
            if outer == "" or inner.startswith(outer + "."):
                problems.append(f"{inner!r} is covered twice: it is also inside {outer or 'the whole model'!r}; "
                                "map each module once")
    placed: dict = {}  # parameter name -> device
    uncovered: list[str] = []
    for pname, *_ in spec.params:
        key = owner_of(pname, dm)
        if key is None:
            uncovered.append(pname)
        else:
            placed[pname] = dm[key]
    if uncovered:
        tops = sorted({_top_uncovered(p, dm) for p in uncovered})
        problems.append(f"not covered by the device map: {', '.join(repr(t) for t in tops[:8])}"
                        f"{' …' if len(tops) > 8 else ''} ({len(uncovered)} parameter tensors); map every module to a device")
    severe, mild = _colocation(spec, placed, dm, work, dtype)
    problems += severe
    warnings += mild
    problems += _no_split(spec, placed)
    if any(d in OFFLOAD for d in placed.values()):
        warnings.append("some modules are offloaded to cpu/disk: they are copied to the GPU at every forward "
                        "pass, which is many times slower")
    memory = per_device(spec, placed, devices, work, dtype)
    for idx, breakdown in memory.items():
        need, cap = sum(breakdown.values()), devices[idx].free
        if need > cap:
            problems.append(f"{devices[idx].label} is over capacity: it needs {fmt_bytes(need)} "
                            f"({describe(breakdown)}) but has {fmt_bytes(cap)}")
    return memory, problems, warnings


def _top_uncovered(pname: str, dm: dict) -> str:
    parts = pname.split(".")
    for j in range(1, len(parts) + 1):
        a = ".".join(parts[:j])
        if not any(k.startswith(a + ".") for k in dm):
            return a
    return pname


def _colocation(spec: ModelSpec, placed: dict, dm: dict, work: Workload, dtype: str) -> tuple[list, list]:
    """(problems, warnings). Weights that share one tensor must share a device. The vision tower,
    projector and embeddings on different devices: transformers' own code moves the image features
    (a warning with what that costs); remote code does not (an error)."""
    problems = []
    heads = {f"{h}.weight" for h in spec.roles.get("head", ())}
    for group in getattr(spec, "tied", ()):
        at = {n: dm[k] for n in group if (k := owner_of(n, dm)) is not None}
        if len(set(at.values())) <= 1:
            continue
        if heads & set(at):
            head = {at[n] for n in heads & set(at)}
            rest = {d for n, d in at.items() if n not in heads}
            problems.append(f"co-location broken: head (tied to the embeddings) on {_fmt_devices(head)}, embeddings "
                            f"on {_fmt_devices(rest)}. A tied head is the embeddings' tensor: map it with them")
        else:
            problems.append(f"tied weights split: {', '.join(group)} are one tensor but sit on "
                            f"{_fmt_devices(set(at.values()))}; map them to one device")
    where: dict[str, set] = {}
    for pname, component, *_ in spec.params:
        if component in spec.family.colocate and pname in placed:
            where.setdefault(component, set()).add(placed[pname])
    devices = set().union(*where.values()) if where else set()
    if len(devices) <= 1:
        return problems, []
    detail = ", ".join(f"{role} on {_fmt_devices(d)}" for role, d in where.items())
    if not spec.family.moves_image_features:
        return problems + [f"co-location broken: {detail}. This model's (remote) code scatters the image features "
                           "into the embedded prompt where they are, so the vision tower, projector and token "
                           "embeddings must share one device — split there, generate fails with 'Expected all "
                           "tensors to be on the same device'"], []
    from vlmlab.model.memory import compute_bytes

    d = spec.dims
    moved = work.batch_size * work.images_per_prompt * max(d.vision_tokens * d.vision_hidden,
                                                           d.image_tokens * d.hidden) * compute_bytes(dtype)
    return problems, [f"vision tower, projector and embeddings on different devices ({detail}): transformers "
                      f"moves the image features between them, about {moved / 2**20:,.1f} MiB per batch of "
                      f"{work.batch_size} (a copy per prefill; over PCIe from the CPU it can dominate)"]


def _no_split(spec: ModelSpec, placed: dict) -> list[str]:
    problems = []
    for mname, mod in spec.modules.named_modules():
        if type(mod).__name__ not in spec.no_split or not mname:
            continue
        devices = {d for p, d in placed.items() if p.startswith(mname + ".")}
        if len(devices) > 1:
            problems.append(f"{mname!r} ({type(mod).__name__}) is split across {_fmt_devices(devices)}; "
                            "this block must stay on one device")
    return problems


def _fmt_devices(devices) -> str:
    return " and ".join(f"GPU{d}" if isinstance(d, int) else str(d) for d in sorted(devices, key=str))


def per_device(spec: ModelSpec, placed: dict, devices: dict, work: Workload, dtype: str) -> dict:
    """Memory per GPU index for parameters placed by name (offloaded ones cost no GPU memory)."""
    partial: dict = {}  # device -> {unit id -> Unit restricted to that device}
    for pname, component, numel, linear, unit in spec.params:
        device = placed.get(pname)
        if not isinstance(device, int):
            continue
        u = partial.setdefault(device, {}).setdefault(id(unit), Unit(unit.name, [], {}, {}, unit.layer))
        u.params[component] = u.params.get(component, 0) + numel
        if linear:
            u.linear[component] = u.linear.get(component, 0) + numel
    if spec.tied_head:  # the tied head computes the logits where the embeddings are
        for units in partial.values():
            for u in units.values():
                if "embeddings" in u.params:
                    u.params.setdefault("head", 0)
    out = {}
    static_cache = keeps_static_cache(spec, dtype)
    for idx, gpu in devices.items():
        load = DeviceLoad(spec.dims, work, dtype, is_cuda=gpu.kind != "cpu",
                          keeps_vision_states=spec.family.keeps_vision_states, static_cache=static_cache)
        for u in partial.get(idx, {}).values():
            load.add(u)
        if idx in partial:
            out[idx] = load.breakdown()
    return out


def describe(breakdown: dict) -> str:
    weights = sum(v for k, v in breakdown.items() if k in ("vision", "projector", "embeddings", "layers", "norm", "head", "other"))
    parts = [("weights", weights), ("KV cache", breakdown.get("kv_cache", 0)),
             ("activations", breakdown.get("activations", 0) + breakdown.get("logits", 0)),
             ("context", breakdown.get("context", 0))]
    return ", ".join(f"{k} {v / 2**30:.1f}" for k, v in parts if v) + " GiB"
