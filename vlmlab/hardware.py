"""GPUs, real or virtual: ``vlmlab.gpus()``.

Real GPUs come from NVML (nvidia-ml-py), which never initialises CUDA in this process; torch is
only a fallback. Virtual boxes are parsed from strings such as ``"2x24GiB"``, ``"a100-40gb"``,
``"h100-80gb,rtx3090"``, ``"4xh200"`` or ``"2xcpu"`` (CPU worker slots, for running the
multi-process machinery without a GPU). ``"ray"`` (or ``"ray://host:10001"``, ``"ray:host:6379"``)
lists the GPUs of a running Ray cluster by node, read by NVML on each node; a cluster without GPUs
gives one CPU slot per CPU of each node.
"""
from __future__ import annotations

import html
import os
import re
from dataclasses import asdict, dataclass, field

GiB = 1024**3
GB = 1000**3

# name -> (display name, memory in bytes, memory bandwidth in GB/s), from the vendors' data sheets.
CARDS: dict[str, tuple[str, int, float]] = {
    "t4": ("Tesla T4", 16 * GiB, 320),
    "v100-16gb": ("Tesla V100 16GB", 16 * GiB, 900),
    "v100-32gb": ("Tesla V100 32GB", 32 * GiB, 900),
    "a10": ("A10", 24 * GiB, 600),
    "a10g": ("A10G", 24 * GiB, 600),
    "l4": ("L4", 24 * GiB, 300),
    "l40s": ("L40S", 48 * GiB, 864),
    "a100-40gb": ("A100 40GB", 40 * GiB, 1555),
    "a100-80gb": ("A100 80GB", 80 * GiB, 2039),
    "h100-80gb": ("H100 80GB", 80 * GiB, 3350),
    "h100-94gb": ("H100 NVL 94GB", 94 * GiB, 3900),
    "h200": ("H200 141GB", 141 * GB, 4800),
    "b200": ("B200 180GB", 180 * GB, 8000),
    "rtx3060": ("GeForce RTX 3060", 12 * GiB, 360),
    "rtx3090": ("GeForce RTX 3090", 24 * GiB, 936),
    "rtx4070": ("GeForce RTX 4070", 12 * GiB, 504),
    "rtx4080": ("GeForce RTX 4080", 16 * GiB, 717),
    "rtx4090": ("GeForce RTX 4090", 24 * GiB, 1008),
    "rtx5090": ("GeForce RTX 5090", 32 * GiB, 1792),
    "rtx-a6000": ("RTX A6000", 48 * GiB, 768),
}
# name -> dense bf16 (fp16 where the card has no bf16) tensor-core TFLOP/s without sparsity, from the
# vendors' data sheets; GeForce cards at fp32 accumulate, as a training or inference framework uses them.
BF16_TFLOPS: dict[str, float] = {
    "t4": 65, "v100-16gb": 125, "v100-32gb": 125, "a10": 125, "l4": 121, "l40s": 362, "a100-40gb": 312,
    "a100-80gb": 312, "h100-80gb": 989, "h100-94gb": 835, "h200": 989, "b200": 2250, "rtx3090": 71,
    "rtx4090": 165, "rtx-a6000": 155,
}
ALIASES = {"a100": "a100-80gb", "h100": "h100-80gb", "h200-141gb": "h200", "v100": "v100-32gb",
           "3090": "rtx3090", "4090": "rtx4090", "a6000": "rtx-a6000"}

_UNITS = {"": GiB, "g": GiB, "gib": GiB, "gb": GB, "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
          "t": 1024**4, "tib": 1024**4, "tb": 1000**4}
_UNIT_NAMES = {"": "GiB", "g": "GiB", "gib": "GiB", "gb": "GB", "m": "MiB", "mib": "MiB", "mb": "MB",
               "t": "TiB", "tib": "TiB", "tb": "TB"}
MAX_DEVICES = 1024  # more than any one plan can use; a typo such as '999999xh100' is refused, not planned for minutes
MIN_DEVICE_MEMORY = 64 * 1024**2  # below this a "device" is a typo ('2x0.0001GiB', '0.5MiB')
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([a-z]*)$")
_COUNT = re.compile(r"^(\d+)\s*[x×*]\s*(.+)$")


@dataclass
class Gpu:
    """One device: a real CUDA GPU, a virtual one (for planning), or a CPU worker slot."""

    index: int
    name: str
    total: int
    free: int
    kind: str = "virtual"  # "cuda" | "virtual" | "cpu"
    utilization: float | None = None  # percent, real GPUs only
    bandwidth: float | None = None  # GB/s, when the card is known
    nvml_index: int | None = None
    uuid: str | None = None
    bf16_tflops: float | None = None  # dense bf16 tensor-core peak, when the card is known
    node: str | None = None  # the Ray node id, for a cluster's devices
    host: str | None = None  # that node's address

    @property
    def used(self) -> int:
        return self.total - self.free

    @property
    def device(self) -> int | str:
        """The value this device takes in a device_map / torch: an int for GPUs, "cpu" for CPU."""
        return "cpu" if self.kind == "cpu" else self.index

    @property
    def label(self) -> str:
        return f"cpu{self.index}" if self.kind == "cpu" else f"GPU{self.index}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Hardware:
    """An ordered set of devices. Empty (and saying why) on a machine with no GPU."""

    devices: list[Gpu] = field(default_factory=list)
    source: str = "virtual"  # "nvml" | "torch" | "virtual" | "none" | "ray"
    message: str = ""
    address: str | None = None  # the Ray cluster's address, for source "ray" (None: found as ray.init finds it)

    def __len__(self):
        return len(self.devices)

    def __iter__(self):
        return iter(self.devices)

    def __getitem__(self, i):
        return self.devices[i]

    def __bool__(self):
        return bool(self.devices)

    @property
    def virtual(self) -> bool:
        return self.source == "virtual"

    @property
    def is_cpu(self) -> bool:
        return bool(self.devices) and all(g.kind == "cpu" for g in self.devices)

    def nodes(self) -> dict:
        """{node: [devices]} in order; one entry (None) for a single machine."""
        out: dict = {}
        for g in self.devices:
            out.setdefault(g.node, []).append(g)
        return out

    def by_index(self, index) -> Gpu | None:
        for g in self.devices:
            if g.device == index or g.index == index:
                return g
        return None

    def select(self, indices=None, min_free=None, n=None) -> "Hardware":
        """A subset: by ``indices`` (list of ints), by ``min_free`` (bytes, or a size such as
        "20GiB"), then the ``n`` with the most free memory."""
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"n must be a positive number of devices, got {n!r}")
        chosen = list(self.devices)
        if indices is not None:
            known = {g.index for g in chosen}
            missing = [i for i in indices if i not in known]
            if missing:
                raise ValueError(f"no device with index {missing}; this hardware has indices {sorted(known)}")
            chosen = [g for g in chosen if g.index in set(indices)]
        if min_free is not None:
            need = parse_size(min_free) if isinstance(min_free, str) else min_free
            if isinstance(need, bool) or not isinstance(need, (int, float)) or need < 0:
                raise ValueError(f"min_free must be a size such as '20GiB' or a number of bytes >= 0, got {min_free!r}")
            chosen = [g for g in chosen if g.free >= need]
        if n is not None:
            chosen = sorted(sorted(chosen, key=lambda g: -g.free)[:n], key=lambda g: g.index)
        return Hardware(chosen, self.source, "" if chosen else "no device matches the selection", self.address)

    def to_dicts(self) -> list[dict]:
        return [g.to_dict() for g in self.devices]

    def to_pandas(self):
        import pandas as pd

        cols = ["index", "name", "kind", "total", "free", "utilization", "bandwidth", "nvml_index"]
        cols += ["node", "host"] if self.source == "ray" else []
        return pd.DataFrame([{c: getattr(g, c) for c in cols} for g in self.devices], columns=cols)

    def __repr__(self):
        if not self.devices:
            return f"Hardware(empty: {self.message})"
        rows = [f"  {g.label}: {g.name}, {fmt_bytes(g.free)} free of {fmt_bytes(g.total)}"
                + (f", node {g.node[:8]} ({g.host})" if g.node else "") for g in self.devices]
        return f"Hardware({self.source}, {len(self)} device(s)\n" + "\n".join(rows) + ")"

    def _repr_html_(self):
        if not self.devices:
            return f"<p><b>No GPU.</b> {html.escape(self.message)}</p>"
        on_nodes = any(g.node for g in self.devices)
        head = "<tr>" + ("<th>node</th>" if on_nodes else "") + "<th>device</th><th>name</th><th>free</th><th>total</th><th>used</th><th>util</th><th>bandwidth</th></tr>"
        rows = []
        for g in self.devices:
            pct = 100 * g.used / g.total if g.total else 0
            bar = (f"<div style='background:#eee;width:120px;height:10px'><div style='background:#4c72b0;"
                   f"width:{pct:.0f}%;height:10px'></div></div>")
            util = "" if g.utilization is None else f"{g.utilization:.0f}%"
            bw = "" if g.bandwidth is None else f"{g.bandwidth:.0f} GB/s"
            node = f"<td title='{g.node}'>{g.node[:8]} ({html.escape(str(g.host))})</td>" if on_nodes else ""
            rows.append(f"<tr>{node}<td>{g.label}</td><td>{html.escape(g.name)}</td><td>{fmt_bytes(g.free)}</td>"
                        f"<td>{fmt_bytes(g.total)}</td><td>{bar}</td><td>{util}</td><td>{bw}</td></tr>")
        return (f"<table class='vlmlab-gpus'><caption>{len(self)} device(s), {self.source}</caption>"
                f"{head}{''.join(rows)}</table>")


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def parse_size(text: str) -> int:
    m = _SIZE.match(text.strip().lower())
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a memory size; write e.g. '24GiB', '40GB' or '80G'")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _card(token: str) -> tuple[str, int, float | None]:
    key = ALIASES.get(token, token)
    if key in CARDS:
        return CARDS[key]
    try:
        size = parse_size(token)
    except ValueError:
        pass
    else:
        number, unit = _SIZE.match(token).groups()
        return (f"virtual {number} {_UNIT_NAMES[unit]}", size, None)
    import difflib

    close = difflib.get_close_matches(key, list(CARDS) + list(ALIASES), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown GPU {token!r} in the hardware spec.{hint} Known cards: {', '.join(CARDS)}; "
                     "or give a size such as '24GiB'.")


def parse(spec: str) -> Hardware:
    """Parse a virtual box: comma-separated items, each ``[N x] card-or-size`` or ``[N x] cpu``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("a hardware spec is a string such as '2x24GiB', 'a100-40gb' or '2xcpu'")
    devices: list[Gpu] = []
    for item in spec.lower().replace(" ", "").split(","):
        if not item:
            raise ValueError(f"{spec!r} has an empty item (two commas in a row, or one at an end); "
                             "write e.g. 'h100-80gb,rtx3090'")
        m = _COUNT.match(item)
        count, token = (int(m.group(1)), m.group(2)) if m else (1, item)
        if count < 1:
            raise ValueError(f"{item!r}: the count of devices must be at least 1")
        if len(devices) + count > MAX_DEVICES:
            raise ValueError(f"{spec!r} asks for {len(devices) + count} devices; vlmlab plans at most {MAX_DEVICES}")
        if token == "cpu" or token.startswith("cpu:"):
            mem = parse_size(token[4:]) if token.startswith("cpu:") else _cpu_share(count)
            _check_memory(item, mem, "cpu:8GiB")
            devices += [Gpu(len(devices) + i, "CPU worker", mem, mem, kind="cpu") for i in range(count)]
            continue
        name, mem, bw = _card(token)
        _check_memory(item, mem, "24GiB")
        devices += [Gpu(len(devices) + i, name, mem, mem, bandwidth=bw, bf16_tflops=_tflops_of(name) if bw else None)
                    for i in range(count)]
    if not devices:
        raise ValueError(f"no device in hardware spec {spec!r}")
    kinds = {g.kind for g in devices}
    if len(kinds) > 1:
        raise ValueError(f"{spec!r} mixes CPU slots and GPUs; plan them separately")
    for i, g in enumerate(devices):
        g.index = i
    return Hardware(devices, "virtual")


def _check_memory(item: str, mem: int, example: str) -> None:
    if mem <= 0:
        raise ValueError(f"{item!r}: a device needs a memory size above zero, e.g. {example!r}")
    if mem < MIN_DEVICE_MEMORY:
        raise ValueError(f"{item!r}: {mem:,} bytes is too little for a device (at least 64 MiB); "
                         f"give a size such as {example!r}")


def _cpu_share(count: int) -> int:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 16 * GiB
    return total // max(count, 1)


# ---- real GPUs ---------------------------------------------------------------------------------

def visible_nvml_indices(visible: str | None, nvml_uuids: list[str]) -> list[int]:
    """Map torch's device order to NVML indices under CUDA_VISIBLE_DEVICES.

    CUDA_VISIBLE_DEVICES lists NVML indices or (prefixes of) UUIDs; torch device i is the i-th
    entry. Parsing stops at the first invalid entry, as CUDA does.
    """
    if visible is None:
        return list(range(len(nvml_uuids)))
    out: list[int] = []
    for tok in (t.strip() for t in visible.split(",")):
        if tok.isdigit() and int(tok) < len(nvml_uuids):
            idx = int(tok)
        elif tok.startswith(("GPU-", "MIG-")):
            hits = [i for i, u in enumerate(nvml_uuids) if u.startswith(tok)]
            if len(hits) != 1:
                break
            idx = hits[0]
        else:
            break
        if idx in out:
            break
        out.append(idx)
    return out


def _from_nvml(visible: str | None = "env") -> Hardware | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - any NVML failure means "no NVML here"
        return None
    try:
        n = pynvml.nvmlDeviceGetCount()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(n)]
        uuids = [_str(pynvml.nvmlDeviceGetUUID(h)) for h in handles]
        devices = []
        visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible == "env" else visible
        for torch_index, nv in enumerate(visible_nvml_indices(visible, uuids)):
            h = handles[nv]
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            try:
                util = float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
            except Exception:  # noqa: BLE001 - not supported on some cards/MIG
                util = None
            name = _str(pynvml.nvmlDeviceGetName(h))
            devices.append(Gpu(torch_index, name, int(mem.total), int(mem.free), kind="cuda",
                               utilization=util, bandwidth=bandwidth_of(name), nvml_index=nv, uuid=uuids[nv],
                               bf16_tflops=_tflops_of(name)))
        return Hardware(devices, "nvml", "" if devices else "NVML sees no GPU visible to this process")
    finally:
        pynvml.nvmlShutdown()


def _from_torch() -> Hardware | None:
    import sys

    if "torch" not in sys.modules:  # importing torch only to learn there is no GPU costs seconds
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    devices = []
    for i in range(torch.cuda.device_count()):  # initialises CUDA: only reached without NVML
        free, total = torch.cuda.mem_get_info(i)
        name = torch.cuda.get_device_name(i)
        devices.append(Gpu(i, name, total, free, kind="cuda", bandwidth=bandwidth_of(name), bf16_tflops=_tflops_of(name)))
    return Hardware(devices, "torch")


def bandwidth_of(name: str) -> float | None:
    """Datasheet memory bandwidth in GB/s of the card called ``name`` (as torch or NVML name it)."""
    key = _card_key(name)
    return CARDS[key][2] if key else None


def _tflops_of(name: str) -> float | None:
    key = _card_key(name)
    return BF16_TFLOPS.get(key) if key else None


def _card_key(name: str) -> str | None:
    """The CARDS key of a device name as NVML, torch or a virtual box write it."""
    low = name.lower()

    def within(part, text):  # not followed by a letter or digit: "A10" is not in "A100", nor "L4" in "L40S"
        return re.search(re.escape(part) + r"(?![a-z0-9])", text) is not None

    for key, (display, _, _) in CARDS.items():
        if within(display.lower(), low) or within(low, display.lower()):
            return key
    squashed = low.replace(" ", "")
    family = [k for k in CARDS if within(k.split("-")[0], low) or within(k.split("-")[0], squashed)]
    sized = [k for k in family if "-" in k and k.split("-", 1)[1] in squashed]  # "A100-SXM4-80GB" -> a100-80gb
    return (sized or family)[0] if family else None


def _str(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def gpus(spec: str | Hardware | None = None) -> Hardware:
    """The GPUs of this machine (``spec=None``), a virtual box (``spec="2x24GiB"``) or a Ray
    cluster (``spec="ray"``, ``"ray://host:10001"``, ``"ray:host:6379"``)."""
    if isinstance(spec, Hardware):
        return spec
    if isinstance(spec, str) and (spec.strip().lower() == "ray" or spec.strip().lower().startswith("ray:")):
        return ray_cluster(spec.strip())
    if spec is not None:
        return parse(spec)
    hw = _from_nvml()
    if hw is not None and hw.devices:
        return hw
    try:
        fallback = _from_torch()
    except Exception:  # noqa: BLE001
        fallback = None
    if fallback is not None and fallback.devices:
        return fallback
    why = hw.message if hw is not None else "NVML is not available (no NVIDIA driver)"
    return Hardware([], "none", f"No GPU found on this machine: {why}. Plan for a virtual box instead, "
                                "e.g. vlmlab.gpus('2x24GiB'), or run on CPU workers with '2xcpu'.")


# ---- a Ray cluster: vlmlab.cluster connects and lists; the devices become Gpus here ----------------

def ray_cluster(spec: str = "ray") -> Hardware:
    """The devices of a Ray cluster, node by node (see :func:`vlmlab.cluster.ray_devices`)."""
    from vlmlab.cluster import ray_devices

    devices, message, address = ray_devices(spec, probe=_node_gpus)
    return Hardware([Gpu(**d) for d in devices], "ray", message, address)


def _node_gpus() -> list[dict]:
    """Runs on one node (a Ray task): every GPU NVML sees there, whatever CUDA_VISIBLE_DEVICES
    Ray gave this task."""
    hw = _from_nvml(visible=None)
    return [g.to_dict() for g in hw] if hw is not None else []
