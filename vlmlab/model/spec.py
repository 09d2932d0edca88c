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
from vlmlab.model import introspect
from vlmlab.model.dims import Dims, read_dims
from vlmlab.model.families import Family, family_for, known_overrides

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
    tied: list[list[str]] = field(default_factory=list)  # parameter names that share one tensor
    image_tokens_source: str = ""  # where dims.image_tokens came from
    image_tokens_error: str | None = None  # why they are unknown (then plans need image_tokens=N)
    given_image_tokens: int | None = None

    def at(self, image_size=None, image_tokens: int | None = None) -> "ModelSpec":
        """This spec with its image tokens counted for ``image_size`` (width, height), or set to
        ``image_tokens``; the module tree is shared."""
        from dataclasses import replace

        from vlmlab.model.image_tokens import normalise_size

        size = normalise_size(image_size)
        given = image_tokens if image_tokens is not None else self.given_image_tokens
        if given is None and size == tuple(self.dims.image_size) and not self.image_tokens_error:
            return self
        cache = self.__dict__.setdefault("_at", {})
        if (size, given) not in cache:
            image, source, error = _image_tokens(self.config, self.family, size, self.path, given, self.modules,
                                                 self.roles.get("vision", ()))
            dims = read_dims(self.config, self.dims.layers, _cross_layers(self.config), image)
            dims.vision_tokens += _class_tokens(self, image) if image is not None and image.vision_tokens else 0
            for key in ("vision_rotary", "projector_in", "projector_width", "projector_wide"):
                setattr(dims, key, getattr(self.dims, key))
            cache[size, given] = replace(self, dims=dims, image_tokens_source=source, image_tokens_error=error,
                                         given_image_tokens=given)
        return cache[size, given]

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


def spec(model: str | os.PathLike | ModelSpec | None = None, trust_remote_code: bool = False,
         roles: dict | None = None, image_tokens: int | None = None) -> ModelSpec:
    """Resolve ``model`` (None = the bundled captioner; a name, a folder, a transformers config or a
    ModelSpec) to a :class:`ModelSpec`. ``roles`` {role: [module names]} names modules introspection
    cannot find; ``image_tokens`` sets the tokens per image where the processor cannot count them."""
    if isinstance(model, ModelSpec):
        return model if roles is None and image_tokens is None else \
            build(model.name, model.config, model.source, model.path, model.hub_id, model.trust_remote_code,
                  model.modules, roles=roles or None, image_tokens=image_tokens)
    if model is None:
        model = DEFAULT_MODEL
    if hasattr(model, "to_dict") and hasattr(model, "model_type"):  # a transformers config
        name = getattr(model, "name_or_path", None) or model.model_type
        return build(name, model, "config", trust_remote_code=trust_remote_code, roles=roles, image_tokens=image_tokens)
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a name, a folder or a ModelSpec, not {type(model).__name__} "
                        "(a transformers config works too)")
    if roles is not None or image_tokens is not None:
        base = _spec_cached(str(model), trust_remote_code, None)  # the config and module tree, once
        return spec(base, roles=roles, image_tokens=image_tokens)
    return _spec_cached(str(model), trust_remote_code, None)


class UnknownModelError(ValueError, KeyError):
    """No folder, catalogue entry or Hub id of that name. A ValueError (bad input) that is still a
    KeyError for callers that caught the catalogue's KeyError."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


@lru_cache(maxsize=32)
def _spec_cached(model: str, trust_remote_code: bool, _unused=None) -> ModelSpec:
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
            raise UnknownModelError(f"{key!r} is not a folder nor a catalogue model. {err.args[0]}") from None
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


def build(name: str, config, source: str, path=None, hub_id=None, trust_remote_code=False, modules=None,
          roles: dict | None = None, image_tokens: int | None = None, image_size=None) -> ModelSpec:
    """A ModelSpec from a config (and optionally an already-built module tree, real or meta).
    Roles are read from the model (``introspect``); ``roles`` names the ones it cannot find."""
    if modules is None:
        modules = _meta_model(config, trust_remote_code)
    names = _names(modules)
    native = not trust_remote_code and type(modules).__module__.startswith("transformers.")
    fam = family_for(config, names, native=native)
    overrides = {**{r: list(v) for r, v in fam.roles.items()}, **{r: list(v) for r, v in (roles or {}).items()}}
    found = introspect.read_roles(modules, overrides)
    missing = introspect.missing_roles(found)
    if missing:
        raise introspect.RolesUnknown(_roles_message(name, config, fam, missing, names))
    no_split = introspect.no_split_classes(modules, found["layers"]) | set(fam.no_split)
    tied = _head_is_tied(modules, found)
    units, params = _units(modules, found, tied)
    from vlmlab.model.image_tokens import normalise_size

    image, counted_by, error = _image_tokens(config, fam, normalise_size(image_size), path, image_tokens, modules,
                                             found["vision"])
    n_layers = sum(1 for u in units if u.layer is not None)
    try:
        dims = read_dims(config, n_layers, _cross_layers(config), image)
    except ValueError as err:  # e.g. an action model whose text config get_text_config() does not find
        raise introspect.RolesUnknown(f"{name}: cannot read the text model's sizes ({err}); vlmlab plans models "
                                      "whose config has a text config with hidden size and head counts") from None
    spec = ModelSpec(name, config, fam, modules, source, path, hub_id, trust_remote_code, found, units,
                     no_split, tied, dims, params, introspect.tied_groups(modules), counted_by, error, image_tokens)
    if image is not None and image.vision_tokens:
        dims.vision_tokens += _class_tokens(spec, image)
    dims.vision_rotary = _vision_rotary(spec)
    dims.projector_in, dims.projector_width, dims.projector_wide = _projector_linears(spec)
    return spec


def _projector_linears(spec) -> tuple[int, int, int]:
    """(in_features of the projector's first nn.Linear, the widest out_features of the layers that read
    the same input (a gated MLP's gate and up), how many of them are that wide)."""
    modules = dict(spec.modules.named_modules())
    linears = [m for p in spec.roles.get("projector", ()) if p in modules for m in modules[p].modules()
               if hasattr(m, "in_features") and hasattr(m, "out_features")]
    if not linears:
        return 0, 0, 0
    first = [m for m in linears if m.in_features == linears[0].in_features]
    width = max(m.out_features for m in first)
    return linears[0].in_features, width, sum(m.out_features == width for m in first)


def _vision_rotary(spec) -> bool:
    """Whether the vision tower holds a rotary-embedding module (read from its module classes)."""
    modules = dict(spec.modules.named_modules())
    return any("rotary" in type(m).__name__.lower() for v in spec.roles.get("vision", ()) if v in modules
               for m in modules[v].modules())


def _roles_message(name, config, fam, missing, names) -> str:
    model_type = getattr(config, "model_type", None)
    if "vision" in missing and not fam.override and _text_only(config):
        return (f"{name}: model_type {model_type!r} builds no vision tower here: its config "
                f"({type(config).__name__}) has no vision config (None or absent), so this is a text-only "
                "configuration; vlmlab plans models that read images (give a config with a vision config, as "
                "the family's image-text checkpoints have, or name the modules with roles=...)")
    archs = sorted(getattr(config, "architectures", None) or ())
    what = f"the {fam.name} adapter found no {', '.join(missing)} module in this model" if fam.override else \
        (f"vlmlab has no family adapter for model_type {model_type!r} (architectures {archs}) and could not read "
         f"its {', '.join(missing)} from the model (transformers' get_input_embeddings / get_decoder / "
         "get_encoder and the vision attribute names found nothing)")
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as native

    return (f"{name}: {what}; its top-level modules are {sorted(n for n in names if '.' not in n)}. Name them "
            f"with roles={{'vision': [...], 'embeddings': [...], 'layers': [...]}} (dotted module names). Read "
            f"without help: every transformers image-text-to-text model type ({', '.join(sorted(native))}); "
            f"remote-code overrides: {', '.join(known_overrides())}.")


def _text_only(config) -> bool:
    """No sub-config of the config describes a vision or image encoder."""
    try:
        values = config.to_dict().items()
    except Exception:  # noqa: BLE001 - a remote config that cannot serialise: do not claim anything
        return False
    return not any(isinstance(v, dict) and v and any(w in k for w in ("vision", "visual", "image", "encoder"))
                   for k, v in values)


def _cross_layers(config):
    from vlmlab.model.dims import text_config

    return introspect.layer_value(text_config(config), "cross_attention_layers")


def _image_tokens(config, fam, size, path, given, modules=None, vision=()):
    """(ImageTokens or None, source, error): given > override entry > the model's own processor."""
    from vlmlab.model import image_tokens as it

    if given is not None:
        if not isinstance(given, int) or isinstance(given, bool) or given < 1:
            raise ValueError(f"image_tokens must be a positive integer, got {given!r}")
        return it.ImageTokens(given, given, size, "given", None, given), "given", None
    if fam.override:
        n = fam.image_tokens or getattr(config, fam.image_tokens_field or "", None) or 64
        return it.ImageTokens(int(n), int(n), size, "override", None, int(n)), f"override ({fam.name})", None
    try:
        image = it.count(config, size, folder=path, model=modules, vision=vision)
    except it.ImageTokensUnknown as err:
        return None, "unknown", str(err)
    return image, image.source, None


def _class_tokens(spec, image) -> int:
    """The class tokens of one image: one per tile (InternVL, Mllama tile an image) when the vision
    tower prepends a class token (CLIP's class_embedding) to the patches of each tile."""
    for pname, component, *_ in spec.params:
        if component == "vision" and pname.rsplit(".", 1)[-1] in ("class_embedding", "cls_token"):
            return _tiles(spec.config, image)
    return 0


def _tiles(config, image) -> int:
    """Tiles of one image: its pixel_values (N, C, side, side), where side is the tower's image size."""
    from vlmlab.model.dims import sub_config

    pixels = (image.inputs or {}).get("pixel_values")
    side = getattr(sub_config(config, "vision_config"), "image_size", None)
    side = side[0] if isinstance(side, (list, tuple)) and side else side  # InternVL: [448, 448]
    if pixels is None or getattr(pixels, "ndim", 0) < 4 or not isinstance(side, int) or side < 1:
        return 1
    return max(1, int(pixels.numel() // (pixels.shape[-3] * side * side)))


def _meta_model(config, trust_remote_code: bool):
    if not trust_remote_code:
        from vlmlab.model.catalog import build_meta_model

        return build_meta_model(config, include_buffers=True)  # no real buffers (some models hold GBs of them)
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=True):  # remote code may register large real buffers
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    # init_empty_weights re-wraps each parameter, which unties a head tied in the constructor: tie again
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()
    return model.eval()


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

