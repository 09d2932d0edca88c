"""What each module of a VLM does, read from the model itself.

Roles: ``vision`` (the vision tower), ``projector`` (what carries its features into the text
model), ``embeddings``, ``layers`` (the decoder-layer list), ``norm`` (final norm), ``head``.
They come from transformers' own API on the meta-built model: ``get_input_embeddings``,
``get_output_embeddings``, ``get_decoder``, ``get_encoder(modality="image")`` and the vision
attribute names transformers itself looks for; the projector is whatever the multimodal model
holds besides its vision tower and language model. A module tree without that API (remote code,
plain torch) is read from its structure: the largest embedding table, the largest layer list
next to it, the linear layer that maps back to the vocabulary. ``overrides`` (data, see
``families.py``) name roles for remote-code models whose vision tower has an unusual name.
"""
from __future__ import annotations

from dataclasses import dataclass

ROLES = ("vision", "projector", "embeddings", "layers", "norm", "head")
# the attribute names transformers' own get_encoder(modality="image") looks for
VISION_NAMES = ("vision_tower", "visual", "vision_model", "vision_encoder", "image_tower")


class RolesUnknown(ValueError):
    """The model's roles could not be read; the message says which and how to name them."""


def named(model) -> dict:
    """id(module) -> its first dotted name."""
    out = {}
    for name, mod in model.named_modules():
        out.setdefault(id(mod), name)
    return out


def _params(mod) -> int:
    return sum(p.numel() for p in mod.parameters())


def _inside(name: str, parent: str) -> bool:
    return parent == "" or name == parent or name.startswith(parent + ".")


def read_roles(model, overrides: dict | None = None) -> dict[str, list[str]]:
    """Role -> module (or parameter) names for ``model``; ``overrides`` {role: candidate names}
    win where one of their names exists in the model."""
    names = named(model)
    modules = dict(model.named_modules())
    all_names = set(modules) | {n for n, _ in model.named_parameters(remove_duplicate=False)}
    roles: dict[str, list[str]] = {r: [] for r in ROLES}
    for role, candidates in (overrides or {}).items():
        roles[role] = [n for n in candidates if n in all_names]

    if not roles["embeddings"]:
        roles["embeddings"] = _embeddings(model, names, modules)
    lm_root = _decoder(model, names, roles["embeddings"])
    if not roles["vision"]:
        roles["vision"] = _vision_by_name(model, names, modules, roles)
    if not roles["layers"]:
        roles["layers"] = _layers(modules, lm_root, roles["embeddings"], roles["vision"])
    if not roles["head"]:
        roles["head"] = _head(model, names, modules, roles["embeddings"])
    if roles["layers"] and not roles["norm"]:
        roles["norm"] = _norm(modules, roles["layers"][0])
    if not roles["vision"]:
        roles["vision"] = _vision(model, names, modules, roles)
    if roles["vision"] and not roles["projector"]:
        roles["projector"] = _projector(model, modules, roles)
    # extra token-embedding tables of the text model (OPT's learned positions) go with the embeddings
    if roles["embeddings"] and roles["layers"]:
        import torch.nn as nn

        text_root = roles["layers"][0].rsplit(".", 1)[0] if "." in roles["layers"][0] else ""
        for name, mod in modules.items():
            if (isinstance(mod, nn.Embedding) and name not in roles["embeddings"] and _inside(name, text_root)
                    and not _inside(name, roles["layers"][0]) and name.rsplit(".", 1)[0] == text_root):
                roles["embeddings"].append(name)
    return roles


def _name_of(mod, names) -> str | None:
    return names.get(id(mod)) if mod is not None else None


def _embeddings(model, names, modules) -> list[str]:
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError, TypeError):
        emb = None
    name = _name_of(emb, names)
    if name:
        return [name]
    import torch.nn as nn

    tables = [(m.weight.shape[0], n) for n, m in modules.items() if isinstance(m, nn.Embedding)]
    return [max(tables)[1]] if tables else []


def _decoder(model, names, embeddings) -> str:
    """The language model's root: transformers' get_decoder(), followed down to where the layers live."""
    root = model
    for _ in range(4):
        try:
            nxt = root.get_decoder()
        except (AttributeError, NotImplementedError, TypeError):
            break
        if nxt is None or nxt is root:
            break
        root = nxt
    name = _name_of(root, names)
    if root is model or name is None:
        return ""
    return name


def _layers(modules, lm_root: str, embeddings, vision) -> list[str]:
    import torch.nn as nn

    best = None
    for name, mod in modules.items():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0 or not _inside(name, lm_root):
            continue
        if any(_inside(name, v) for v in vision):
            continue
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        # the decoder's own list sits next to (an ancestor of) the token embeddings, unless the API named the decoder
        if not lm_root and embeddings and not any(_inside(e, parent) for e in embeddings):
            continue
        size = _params(mod)
        if best is None or size > best[0]:
            best = (size, name)
    return [best[1]] if best else []


def _head(model, names, modules, embeddings) -> list[str]:
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError, TypeError):
        head = None
    name = _name_of(head, names)
    if name:
        return [name]
    import torch.nn as nn

    if not embeddings:
        return []
    vocab = modules[embeddings[0]].weight.shape[0] if hasattr(modules[embeddings[0]], "weight") else None
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear) and m.out_features == vocab]
    return linears[-1:]


def _norm(modules, layers: str) -> list[str]:
    parent = layers.rsplit(".", 1)[0] if "." in layers else ""
    holder = modules[parent]
    out = []
    for child, mod in holder.named_children():
        if "norm" in type(mod).__name__.lower() or "norm" in child.lower():
            if any(True for _ in mod.parameters()):
                out.append(f"{parent}.{child}" if parent else child)
    return out[-1:]


def _vision_by_name(model, names, modules, roles) -> list[str]:
    try:
        enc = model.get_encoder(modality="image")
    except (AttributeError, NotImplementedError, TypeError, ValueError):
        enc = None
    name = _name_of(enc, names)
    text = roles["layers"] + roles["embeddings"]
    if name and not any(_inside(t, name) for t in text):
        return [name]
    known = [n for n in modules if n.rsplit(".", 1)[-1] in VISION_NAMES + ("image_encoder",)
             and not any(_inside(t, n) for t in text)]
    if known:
        return [min(known, key=lambda n: n.count("."))]
    return []


def _vision(model, names, modules, roles) -> list[str]:
    """No known name: the largest module next to the language model that is not part of it."""
    text = roles["layers"] + roles["embeddings"]
    root = _outer_parent(model, names)
    if root is None:
        root = _common_parent(roles)
    if root is None or root not in modules:
        return []
    holder = modules[root]
    best = None
    for child, mod in holder.named_children():
        full = f"{root}.{child}" if root else child
        if any(_inside(t, full) or _inside(full, t) for t in text + roles["head"] + roles["norm"]):
            continue
        size = _params(mod)
        if size and (best is None or size > best[0]):
            best = (size, full)
    return [best[1]] if best else []


def _outer_parent(model, names) -> str | None:
    """The parent of the module transformers' get_decoder() names (the encoder-decoder's top)."""
    try:
        dec = model.get_decoder()
    except (AttributeError, NotImplementedError, TypeError):
        return None
    name = _name_of(dec, names)
    if dec is model or not name:
        return None
    return name.rsplit(".", 1)[0] if "." in name else ""


def _common_parent(roles) -> str | None:
    """The module that holds the language model next to the image path (e.g. ``model``)."""
    if not roles["layers"]:
        return None
    parts = roles["layers"][0].split(".")
    emb = roles["embeddings"][0].split(".") if roles["embeddings"] else parts
    common = []
    for a, b in zip(parts, emb):
        if a != b:
            break
        common.append(a)
    # step out of the text model itself: its parent holds the vision tower
    return ".".join(common[:-1]) if len(common) > 1 else ""


def _projector(model, modules, roles) -> list[str]:
    """Everything the multimodal model holds besides the vision tower and the language model, plus
    the tower's own output stage (Qwen's merger) that follows its block list."""
    vision = roles["vision"][0]
    out = []
    text = roles["layers"] + roles["embeddings"] + roles["norm"] + roles["head"]
    holder_name = vision.rsplit(".", 1)[0] if "." in vision else ""
    holder = modules[holder_name]
    text_roots = {_child_towards(holder_name, t) for t in text}
    for child, mod in holder.named_children():
        full = f"{holder_name}.{child}" if holder_name else child
        if full == vision or full in text_roots or not any(True for _ in mod.parameters()):
            continue
        out.append(full)
    for pname, _ in holder.named_parameters(recurse=False):
        out.append(f"{holder_name}.{pname}" if holder_name else pname)
    import torch.nn as nn

    tower = modules[vision]
    children = list(tower.named_children())
    block_at = next((i for i, (_, m) in enumerate(children) if isinstance(m, nn.ModuleList)), None)
    if block_at is not None:
        for child, mod in children[block_at + 1:]:
            if any(True for _ in mod.parameters()) and "norm" not in type(mod).__name__.lower():
                out.append(f"{vision}.{child}")
    return out


def _child_towards(parent: str, name: str) -> str:
    rest = name[len(parent) + 1:] if parent else name
    head = rest.split(".")[0]
    return f"{parent}.{head}" if parent else head


def tied_groups(model) -> list[list[str]]:
    """Parameter names that share one tensor (a tied head and embeddings, shared encoder/decoder tables)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def no_split_classes(model, layers: list[str]) -> set[str]:
    """Module classes never split across devices: the model's own list plus its decoder layer class."""
    out = set()
    getter = getattr(model, "_get_no_split_modules", None)
    try:
        out |= set(getter("auto")) if callable(getter) else set()
    except Exception:  # noqa: BLE001 - remote code without the attribute transformers expects
        pass
    out |= set(getattr(model, "_no_split_modules", None) or ())
    modules = dict(model.named_modules())
    for name in layers:
        for layer in modules[name]:
            out.add(type(layer).__name__)
    return out


def missing_roles(roles) -> list[str]:
    return [r for r in ("vision", "embeddings", "layers") if not roles[r]]


@dataclass(frozen=True)
class LayerCache:
    """What one decoder layer keeps per sequence while generating."""

    kind: str  # "full", "sliding", "linear" (recurrent / linear-attention state), "cross", "none"
    kv_heads: int = 0
    head_dim: int = 0
    window: int | None = None  # sliding: tokens kept
    state_elems: int = 0  # linear: elements of state per sequence (constant in length)


def layer_value(cfg, key: str, i: int | None = None, default=None):
    """``cfg.key``, read per layer where the config is heterogeneous (Gemma-4 style)."""
    try:
        value = getattr(cfg, key, None)
    except Exception:  # noqa: BLE001 - AmbiguousGlobalPerLayerAttributeError: a per-layer attribute
        value = None
        per_layer = getattr(cfg, "per_layer_config", None)
        if per_layer is not None:
            try:
                if i is not None:
                    value = getattr(per_layer[i], key, None)
                else:
                    values = [getattr(per_layer[j], key, None) for j in range(len(per_layer))]
                    values = [v for v in values if v is not None]
                    value = max(values) if values else None
            except Exception:  # noqa: BLE001
                value = None
    return default if value is None else value


_LINEAR = ("linear", "mamba", "conv", "recurrent", "gated_delta", "deltanet", "ssm", "rwkv", "lightning")


def kv_layout(text_config, n_layers: int, cross_attention_layers=None) -> list[LayerCache]:
    """Per decoder layer: what its cache holds, from the config fields transformers' cache classes read
    (``layer_types``, ``sliding_window``, ``cross_attention_layers``, head counts)."""
    tc = text_config
    types = layer_value(tc, "layer_types") or []
    cross = set(cross_attention_layers if cross_attention_layers is not None
                else (layer_value(tc, "cross_attention_layers") or []))
    out = []
    for i in range(n_layers):
        heads = layer_value(tc, "num_attention_heads", i) or layer_value(tc, "n_head", i) or 1
        kv = layer_value(tc, "num_key_value_heads", i) or heads
        hidden = layer_value(tc, "hidden_size", i) or layer_value(tc, "d_model", i) or 0
        head_dim = layer_value(tc, "head_dim", i) or (hidden // heads if heads else 0)
        kind = str(types[i]) if i < len(types) else "full_attention"
        if i in cross:
            out.append(LayerCache("cross", kv, head_dim))
        elif "sliding" in kind or "chunked" in kind or "local" in kind:
            window = layer_value(tc, "sliding_window", i) or layer_value(tc, "attention_chunk_size", i)
            out.append(LayerCache("sliding", kv, head_dim, window=window))
        elif any(k in kind for k in _LINEAR):
            out.append(LayerCache("linear", state_elems=_state_elems(tc, i, hidden)))
        else:
            out.append(LayerCache("full", kv, head_dim))
    return out


def _state_elems(tc, i, hidden) -> int:
    """Elements of a linear-attention / SSM layer's recurrent and convolution state per sequence."""
    heads = layer_value(tc, "linear_num_value_heads", i) or layer_value(tc, "mamba_num_heads", i)
    kdim = layer_value(tc, "linear_key_head_dim", i) or layer_value(tc, "mamba_d_state", i) or \
        layer_value(tc, "ssm_state_size", i) or layer_value(tc, "state_size", i)
    vdim = layer_value(tc, "linear_value_head_dim", i) or layer_value(tc, "mamba_head_dim", i)
    conv = layer_value(tc, "linear_conv_kernel_dim", i) or layer_value(tc, "conv_kernel", i) or \
        layer_value(tc, "mamba_d_conv", i) or 4
    if heads and kdim and vdim:
        return int(heads * kdim * vdim + conv * hidden * 2)
    expand = layer_value(tc, "mamba_expand", i) or layer_value(tc, "expand", i) or 2
    d_state = kdim or 128
    return int(expand * hidden * d_state + conv * expand * hidden)
