"""Model specs: ``vlmlab.spec(model)`` -> config, family adapter and module tree on the meta device.

Nothing is downloaded or allocated: the module tree is built under accelerate's
``init_empty_weights`` so sizes are exact. Sources, in order: a ``ModelSpec`` (returned as is), the
bundled captioner, a local folder, the built-in catalogue, and (online) a Hub id, config only.
"""
from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from vlmlab.assets import BUNDLED_MODEL_DIR
from vlmlab.model.families import Family, family_for

DEFAULT_MODEL = "vlmlab/tiny-captioner"
BUNDLED = {DEFAULT_MODEL: BUNDLED_MODEL_DIR}
COMPONENTS = ("vision", "projector", "embeddings", "layers", "norm", "head", "other")


@dataclass
class Unit:
    """A block the planner places whole: the co-located input group, one decoder layer, the final
    norm, or the head. ``params``/``linear``: parameter counts per component (linear = weights of
    nn.Linear layers, the ones int8/int4 quantisation shrinks)."""

    name: str
    members: list[str]
    params: dict[str, int] = field(default_factory=dict)
    linear: dict[str, int] = field(default_factory=dict)
    layer: int | None = None


@dataclass
class Dims:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    vision_tokens: int  # tokens inside the vision encoder per image
    image_tokens: int  # tokens the language model sees per image


@dataclass
class ModelSpec:
    name: str
    config: object
    family: Family
    modules: object  # the model on the meta device
    source: str  # "bundled" | "folder" | "catalogue" | "hub"
    path: str | None = None
    hub_id: str | None = None
    trust_remote_code: bool = False
    roles: dict[str, list[str]] = field(default_factory=dict)
    units: list[Unit] = field(default_factory=list)
    no_split: set[str] = field(default_factory=set)
    tied_head: bool = False
    dims: Dims | None = None
    params: list[tuple] = field(default_factory=list)  # (name, component, numel, is_linear, unit) per parameter

    @property
    def num_parameters(self) -> int:
        return sum(sum(u.params.values()) for u in self.units)

    def params_by_component(self) -> dict[str, int]:
        out = dict.fromkeys(COMPONENTS, 0)
        for u in self.units:
            for c, n in u.params.items():
                out[c] += n
        return out

    def module_names(self) -> set[str]:
        return _names(self.modules)

    def __repr__(self):
        return (f"ModelSpec({self.name!r}, family={self.family.name}, {self.num_parameters / 1e9:.2f}B params, "
                f"{self.dims.layers} layers, source={self.source})")

    def _repr_html_(self):
        rows = "".join(f"<tr><td>{c}</td><td>{n / 1e6:,.1f} M</td><td>{html.escape(', '.join(self.roles.get(c, [])))}</td></tr>"
                       for c, n in self.params_by_component().items() if n)
        return (f"<b>{html.escape(self.name)}</b> — {self.family.name}, {self.num_parameters / 1e9:.2f}B parameters, "
                f"{self.dims.layers} decoder layers, {self.dims.image_tokens} image tokens/image ({self.source})"
                f"<table><tr><th>component</th><th>parameters</th><th>modules</th></tr>{rows}</table>")


def _names(model) -> set[str]:
    names = {n for n, _ in model.named_modules() if n}
    names |= {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return names


def spec(model: str | os.PathLike | ModelSpec | None = None, trust_remote_code: bool = False) -> ModelSpec:
    """Resolve ``model`` (None = the bundled captioner) to a :class:`ModelSpec`."""
    if isinstance(model, ModelSpec):
        return model
    if model is None:
        model = DEFAULT_MODEL
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a name, a folder or a ModelSpec, not {type(model).__name__}")
    return _spec_cached(str(model), trust_remote_code)


@lru_cache(maxsize=32)
def _spec_cached(model: str, trust_remote_code: bool) -> ModelSpec:
    from vlmlab.model import catalog

    key = model.strip()
    if key.lower() in {k.lower() for k in BUNDLED} or key.lower() == "tiny-captioner":
        folder = BUNDLED[DEFAULT_MODEL]
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"the bundled captioner is missing from {folder}; reinstall vlmlab")
        return _from_folder(DEFAULT_MODEL, folder, "bundled", trust_remote_code)
    if Path(key).expanduser().is_dir():
        folder = Path(key).expanduser().resolve()
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"{folder} is a folder but has no config.json; point at a saved model folder")
        return _from_folder(key, folder, "folder", trust_remote_code)
    try:
        entry = catalog.entry(key)
    except KeyError as err:
        if "/" not in key:
            raise KeyError(f"{key!r} is not a folder nor a catalogue model. {err.args[0]}") from None
    else:
        name = entry["name"]
        return build(name, catalog.build_config(name), "catalogue", hub_id=entry["hub_id"])
    return _from_hub(key, trust_remote_code)


def _from_folder(name, folder: Path, source, trust_remote_code) -> ModelSpec:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    return build(name, config, source, path=str(folder), trust_remote_code=trust_remote_code)


def _from_hub(model_id: str, trust_remote_code: bool) -> ModelSpec:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - network, auth, missing repo: all need the same advice
        from vlmlab.model import catalog

        raise OSError(
            f"could not fetch the config of {model_id!r} from the Hugging Face Hub ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]}). Offline, use a local folder or a catalogue model: "
            f"{', '.join(catalog.names())}.") from None
    return build(model_id, config, "hub", hub_id=model_id, trust_remote_code=trust_remote_code)


def build(name: str, config, source: str, path=None, hub_id=None, trust_remote_code=False, modules=None) -> ModelSpec:
    """A ModelSpec from a config (and optionally an already-built module tree, real or meta)."""
    if modules is None:
        modules = _meta_model(config, trust_remote_code)
    names = _names(modules)
    fam = family_for(config, names)
    roles = fam.resolve(names)
    missing = [r for r in ("vision", "embeddings", "layers") if not roles[r]]
    if missing:
        raise ValueError(f"{name}: the {fam.name} adapter found no {', '.join(missing)} module in this model; "
                         f"its top-level modules are {sorted(n for n in names if '.' not in n)}")
    no_split = set(getattr(modules, "_no_split_modules", None) or ()) | set(fam.no_split)
    tied = _head_is_tied(modules, roles)
    units, params = _units(modules, roles, tied)
    return ModelSpec(name, config, fam, modules, source, path, hub_id, trust_remote_code, roles, units,
                     no_split, tied, _dims(config, fam, units), params)


def _meta_model(config, trust_remote_code: bool):
    if not trust_remote_code:
        from vlmlab.model.catalog import build_meta_model

        return build_meta_model(config)
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, trust_remote_code=True)


def _head_is_tied(model, roles) -> bool:
    params = dict(model.named_parameters(remove_duplicate=False))
    for head in roles["head"]:
        for emb in roles["embeddings"]:
            h, e = params.get(head + ".weight"), params.get(emb + ".weight")
            if h is not None and h is e:
                return True
    return False


def _units(model, roles, tied) -> list[Unit]:
    import torch.nn as nn

    members = {m: r for r, ms in roles.items() for m in ms}
    by_len = sorted(members, key=len, reverse=True)

    def owner(name):
        for m in by_len:
            if name == m or name.startswith(m + "."):
                return m
        return None

    linear_weights = {f"{mn}.weight" if mn else "weight" for mn, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    first = Unit("input", [])
    layers: dict[int, Unit] = {}
    norm, head = Unit("norm", []), Unit("head", [])
    other_names: set[str] = set()
    table = []

    def add(unit, component, pname, numel):
        unit.params[component] = unit.params.get(component, 0) + numel
        if pname in linear_weights:
            unit.linear[component] = unit.linear.get(component, 0) + numel
        table.append((pname, component, numel, pname in linear_weights, unit))

    for pname, p in model.named_parameters():  # tied weights appear once, under their first name
        m = owner(pname)
        if m is None:
            other_names.add(_leftover(pname, members))
            add(first, "other", pname, p.numel())
            continue
        role = members[m]
        if role == "layers":
            idx = int(pname[len(m) + 1:].split(".")[0])
            unit = layers.setdefault(idx, Unit(f"layer {idx}", [f"{m}.{idx}"], layer=idx))
        elif role in ("norm",):
            unit = norm
        elif role == "head" and not tied:
            unit = head
        else:
            unit = first
        add(unit, role, pname, p.numel())
    for bname, _ in model.named_buffers():
        if owner(bname) is None:
            other_names.add(_leftover(bname, members))
    first.members = [m for r in ("vision", "projector", "embeddings") for m in roles[r]]
    first.members += sorted(other_names)
    if tied:
        first.members += roles["head"]
        first.params.setdefault("head", 0)
    norm.members, head.members = list(roles["norm"]), list(roles["head"])
    units = [first] + [layers[i] for i in sorted(layers)]
    units += [u for u in (norm, head) if u.members and (u is not head or not tied)]
    return _drop_nested(units), table


def _drop_nested(units: list[Unit]) -> list[Unit]:
    """A unit lists a module once: nested names (e.g. Qwen's merger inside its vision tower) go."""
    for u in units:
        u.members = [m for m in u.members if not any(m != o and m.startswith(o + ".") for o in u.members)]
    return units


def _leftover(name: str, members: dict) -> str:
    """The highest ancestor of ``name`` that holds no role module and is inside none."""
    parts = name.split(".")
    for j in range(1, len(parts) + 1):
        a = ".".join(parts[:j])
        if not any(m == a or m.startswith(a + ".") or a.startswith(m + ".") for m in members):
            return a
    return name


def _dims(config, fam: Family, units) -> Dims:
    tc = config.get_text_config() if hasattr(config, "get_text_config") else config
    vc = getattr(config, "vision_config", None) or config
    hidden = _get(tc, "hidden_size", "d_model", "n_embd")
    heads = _get(tc, "num_attention_heads", "n_head")
    kv = _get(tc, "num_key_value_heads", default=heads) or heads
    head_dim = getattr(tc, "head_dim", None) or hidden // heads
    n_layers = sum(1 for u in units if u.layer is not None)
    v_hidden = _get(vc, "hidden_size", "embed_dim", default=hidden)
    image_tokens = int(fam.image_tokens(config)) if fam.image_tokens else 256
    size = getattr(vc, "image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    patch = getattr(vc, "patch_size", 14)
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    merge = fam.merge(config) if callable(fam.merge) else fam.merge
    vision_tokens = max((size // patch) ** 2 + 1, image_tokens * merge)
    return Dims(hidden, _get(tc, "intermediate_size", "ffn_dim", default=4 * hidden), n_layers, heads, kv, head_dim,
                _get(tc, "vocab_size"), v_hidden, _get(vc, "intermediate_size", default=4 * v_hidden),
                _get(vc, "num_hidden_layers", "depth", default=0), _get(vc, "num_attention_heads", "num_heads", default=1),
                vision_tokens, image_tokens)


def _get(cfg, *keys, default=None):
    for k in keys:
        v = getattr(cfg, k, None)
        if v is not None:
            return v
    if default is None:
        raise ValueError(f"config {type(cfg).__name__} has none of {keys}")
    return default
