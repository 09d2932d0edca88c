"""``vlmlab.load()``: put a model on devices by a Plan, and keep a registry of what is loaded where.

The registry refuses a second copy of the same model on devices that already hold it (the
classic notebook OOM: a demo loads once per GPU *and* with ``device_map="auto"``) unless
``force=True``; ``unload()`` gives the memory back.
"""
from __future__ import annotations

import gc
import html
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from vlmlab.hardware import fmt_bytes
from vlmlab.model.memory import canonical_dtype
from vlmlab.plan.plan import Plan

_REGISTRY: list["LoadedModel"] = []
#: RMSNorm layers on torch's fused kernel at load (``vlmlab.run.fused_norms``); benchmarks compare without
FUSED_NORMS = True
#: the rotary embedding in three kernels at load (``vlmlab.run.fast_rotary``); benchmarks compare without
FAST_ROTARY = True


class AlreadyLoadedError(RuntimeError):
    """The same model already sits on these devices; a second copy would double the memory."""


@dataclass
class LoadedModel:
    name: str
    model: object
    processor: object
    plan: Plan
    dtype: str
    devices: list  # GPU indices and/or "cpu"
    random_weights: bool = False
    loaded_at: float = field(default_factory=time.time)
    replica: int = 0

    @property
    def device_map(self) -> dict:
        return self.plan.replicas[self.replica].device_map

    @property
    def input_device(self):
        """Where inputs go: the device of the vision tower / embeddings group."""
        first = next(iter(self.device_map.values()))
        return f"cuda:{first}" if isinstance(first, int) else "cpu"

    def memory_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters()) if self.model is not None else 0

    def unload(self):
        unload(self)

    def __repr__(self):
        where = ", ".join(_label(d) for d in self.devices)
        return f"LoadedModel({self.name!r}, {self.dtype}, on {where}{', random weights' if self.random_weights else ''})"

    def _repr_html_(self):
        return f"<code>{html.escape(repr(self))}</code> — {fmt_bytes(self.memory_bytes())} of weights"


def _label(d):
    return f"GPU{d}" if isinstance(d, int) else str(d)


def loaded() -> list[LoadedModel]:
    """What is loaded now, oldest first."""
    return list(_REGISTRY)


def unload(model=None) -> int:
    """Unload a LoadedModel, every model of a name, or (None) everything; returns how many."""
    from vlmlab.model.spec import spec as get_spec

    if model is None:
        targets = list(_REGISTRY)
    elif isinstance(model, LoadedModel):
        targets = [model] if model in _REGISTRY else []
    else:
        path = _path_of(model)
        targets = [m for m in _REGISTRY if _same_model(m, model, path)]
        if not targets and path is None:  # e.g. a catalogue alias of a loaded name
            name = get_spec(model).name
            targets = [m for m in _REGISTRY if m.name == name]
    from vlmlab.run.fast_generate import forget

    for m in targets:
        _REGISTRY.remove(m)
        forget(m)  # its static cache and compiled prefill
        m.model = None
        m.processor = None
    gc.collect()
    if any(isinstance(d, int) for m in targets for d in m.devices):
        import torch

        torch.cuda.empty_cache()
    return len(targets)


def load(model=None, gpus=None, strategy: str = "single", dtype: str | None = None, random_weights: bool = False,
         trust_remote_code: bool = False, allow_pickle: bool = False, force: bool = False, replica: int = 0,
         **plan_kwargs) -> LoadedModel:
    """Load ``model`` (None = the bundled captioner; a name, folder, Hub id or a Plan).

    ``random_weights=True`` builds the architecture from its config with random weights directly
    on the planned devices: the way to measure a big model's memory and speed before downloading it.
    Weights load from safetensors only unless ``allow_pickle=True``; remote code runs only with
    ``trust_remote_code=True``.
    """
    from vlmlab.plan.planner import plan as make_plan

    if isinstance(model, Plan):
        p = model
        if dtype is not None and canonical_dtype(dtype) != p.dtype:
            raise ValueError(f"the plan was made for {p.dtype}; re-plan for {dtype} instead of overriding it")
    else:
        if dtype is None:
            from vlmlab.plan.planner import _hardware

            hw, _ = _hardware(gpus)
            dtype = "float32" if hw.is_cpu else "bfloat16"
        p = make_plan(model, gpus=gpus, strategy=strategy, dtype=dtype, trust_remote_code=trust_remote_code,
                      **plan_kwargs)
    p.validate()
    if p.hardware.source == "ray":
        raise ValueError("this plan places the model on a Ray cluster's devices: its replicas load there, one Ray "
                         "actor each, when you run it: vlmlab.caption(images, model=plan) (or bench / profile)")
    if not 0 <= replica < len(p.replicas):
        raise ValueError(f"replica {replica} does not exist; the plan has {len(p.replicas)}")
    dm = p.replicas[replica].device_map
    devices = sorted({d for d in dm.values()}, key=str)
    ms = p._spec()
    _guard(p.model, devices, force, _path_of(ms.path) if ms.path else None)
    if random_weights:
        model_obj, processor = _random(ms, dm, p.dtype), None
    else:
        model_obj, processor = _pretrained(ms, dm, p.dtype, trust_remote_code, allow_pickle)
    model_obj.eval()
    from vlmlab.run.fast_rotary import use_fast_rotary
    from vlmlab.run.fused_norms import fuse_rms_norms
    from vlmlab.run.gqa_decode import use_gqa_decode
    from vlmlab.run.packed_attention import use_packed_attention

    use_packed_attention(model_obj)  # windowed vision towers: one SDPA call per window length, not per window
    use_gqa_decode(model_obj)  # transformers before pack_gqa: no copies of grouped KV heads per decode step
    if FUSED_NORMS:
        model_obj.__dict__["_vlmlab_fused_norms"] = fuse_rms_norms(model_obj)  # on a GPU in half precision only
    if FAST_ROTARY:
        model_obj.__dict__["_vlmlab_fast_rotary"] = use_fast_rotary(model_obj)  # likewise
    lm = LoadedModel(p.model, model_obj, processor, p, p.dtype, devices, random_weights, replica=replica)
    _REGISTRY.append(lm)
    return lm


def find(name, devices=None) -> LoadedModel | None:
    """The most recent loaded copy of ``name`` (on ``devices`` if given). A folder and the name it
    was loaded by (e.g. the bundled captioner's folder and "vlmlab/tiny-captioner") are the same model."""
    path = _path_of(name)
    for m in reversed(_REGISTRY):
        if _same_model(m, name, path) and (devices is None or set(devices) <= set(m.devices)):
            return m
    return None


def _path_of(name) -> str | None:
    """The resolved folder of a bundled name or a local folder; None for catalogue names and Hub ids."""
    import os
    from pathlib import Path

    from vlmlab.model.spec import BUNDLED

    if name in BUNDLED:
        return str(BUNDLED[name].resolve())
    try:
        p = Path(name).expanduser()
        return str(p.resolve()) if isinstance(name, (str, os.PathLike)) and p.is_dir() else None
    except (OSError, TypeError):
        return None


def _same_model(m: LoadedModel, name, path) -> bool:
    if m.name == name:
        return True
    if path is None:
        return False
    spec = m.plan.spec
    other = spec.path if spec is not None and spec.path else _path_of(m.name)
    return other is not None and _path_of(other) == path


def _guard(name, devices, force, path=None):
    for m in _REGISTRY:
        overlap = set(m.devices) & set(devices)
        if _same_model(m, name, path) and overlap and not force:
            same = "" if m.name == name else f" as {m.name!r}"
            raise AlreadyLoadedError(
                f"{name} is already loaded{same} on {', '.join(_label(d) for d in sorted(overlap, key=str))} "
                f"({fmt_bytes(m.memory_bytes())} of weights). A second copy there doubles the memory — the usual "
                f"cause of an OOM in notebooks that load per GPU and with device_map='auto'. Use the loaded one "
                f"(vlmlab.loaded()), free it first (vlmlab.unload({m.name!r})), or pass force=True.")


def _torch_dtype(dtype: str):
    import torch

    if dtype in ("int8", "int4"):
        return torch.bfloat16
    return getattr(torch, dtype)


def _quantization(dtype: str):
    if dtype not in ("int8", "int4"):
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ImportError(f"{dtype} loading needs bitsandbytes and a CUDA GPU: pip install bitsandbytes; "
                          f"or plan with dtype='bfloat16'") from None
    from transformers import BitsAndBytesConfig

    if dtype == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)


def _pretrained(ms, dm, dtype, trust_remote_code, allow_pickle):
    from transformers import AutoModelForImageTextToText

    from vlmlab.model.saved_processor import load_processor

    source = ms.path or ms.hub_id or ms.name
    kwargs = dict(dtype=_torch_dtype(dtype), device_map=dict(dm), trust_remote_code=trust_remote_code,
                  use_safetensors=None if allow_pickle else True)
    q = _quantization(dtype)
    if q is not None:
        kwargs["quantization_config"] = q
    try:
        with _no_transformers_bars():  # vlmlab shows one progress bar per run, not one per loaded file
            model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
        processor = load_processor(source, trust_remote_code=trust_remote_code)  # images need no torchvision
    except OSError as err:
        pickles = _pickle_files(ms.path) if ms.path and not allow_pickle else []
        if pickles:
            raise OSError(f"{source} has no safetensors weights, only pickle files ({', '.join(pickles[:3])}), and "
                          f"unpickling can run arbitrary code. vlmlab loads safetensors only unless you pass "
                          f"allow_pickle=True, if you trust this folder.") from None
        if ms.source in ("catalogue", "hub"):
            raise OSError(f"could not load {source!r} from the Hugging Face Hub ({str(err).splitlines()[0][:200]}). "
                          f"Offline, pass a local folder, the bundled 'vlmlab/tiny-captioner', or random_weights=True "
                          f"to build {ms.name} with random weights.") from None
        raise
    return model, processor


@contextmanager
def _no_transformers_bars():
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _pickle_files(folder) -> list[str]:
    from pathlib import Path

    try:
        return sorted(p.name for p in Path(folder).iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
    except OSError:
        return []


def _random(ms, dm, dtype):
    """The real architecture with random weights, materialised straight onto the planned devices."""
    import torch
    from accelerate import dispatch_model

    from vlmlab.model.spec import _meta_model

    model = _meta_model(ms.config, ms.trust_remote_code)
    tdtype = _torch_dtype(dtype)
    gen = torch.Generator().manual_seed(0)
    for key, device in dm.items():
        target = torch.device(f"cuda:{device}" if isinstance(device, int) else device)
        _materialise(model, key, target, tdtype, gen)
    if ms.tied_head:
        model.tie_weights()
    if len({str(d) for d in dm.values()}) > 1:
        model = dispatch_model(model, device_map=dm)
    return model


def _materialise(model, key, device, dtype, gen):
    import torch

    root = model if key == "" else model.get_submodule(key) if _is_module(model, key) else None
    if root is None:  # a parameter named directly, e.g. BLIP-2's query_tokens
        parent_name, _, attr = key.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
        setattr(parent, attr, torch.nn.Parameter(_init(old, device, dtype, gen, attr), requires_grad=False))
        return
    for mod_name, mod in root.named_modules():
        for pname, p in list(mod.named_parameters(recurse=False)):
            mod._parameters[pname] = torch.nn.Parameter(_init(p, device, dtype, gen, pname, mod), requires_grad=False)
        for bname, b in list(mod.named_buffers(recurse=False)):
            if b is not None:
                mod._buffers[bname] = b.to(device) if b.device.type != "meta" else torch.zeros(b.shape, dtype=b.dtype, device=device)


def _is_module(model, key):
    try:
        model.get_submodule(key)
        return True
    except AttributeError:
        return False


def _init(p, device, dtype, gen, pname, mod=None):
    import torch

    kind = type(mod).__name__.lower() if mod is not None else ""
    if "norm" in kind and pname == "weight":
        return torch.ones(p.shape, dtype=dtype, device=device)
    if pname == "bias":
        return torch.zeros(p.shape, dtype=dtype, device=device)
    if device.type == "cpu":  # seeded, so CPU runs are repeatable
        return torch.randn(p.shape, generator=gen).mul_(0.02).to(dtype)
    return torch.empty(p.shape, dtype=dtype, device=device).normal_(0.0, 0.02)
