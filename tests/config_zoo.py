"""A test set of configs for every image-text-to-text model type transformers can build here.

Each config is transformers' own default for the ``model_type`` (``AutoConfig.for_model``; a vision
sub-config the default leaves None gets its class's default), made
small by a generic shrink: every (sub-)config's layer counts become 2 (per-layer lists such as
``layer_types`` are dropped so the config re-derives them), so module trees build on the meta
device in a fraction of a second while widths, head counts, vocabularies and image geometry stay
the published defaults. ``PUBLISHED`` lists types also built at their full default size.
"""
from __future__ import annotations

import copy
import warnings

LAYER_KEYS = ("num_hidden_layers", "num_layers", "depth", "n_layers", "encoder_layers", "decoder_layers",
              "num_decoder_layers", "text_layers", "vision_layers")
PER_LAYER_LISTS = ("layer_types", "mlp_only_layers", "full_attention_layers", "fullatt_block_indexes")
SMALL_LAYERS = 2
PUBLISHED = ("llava", "qwen2_vl", "gemma3", "idefics3", "mllama")


def image_text_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return sorted(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


def _shrink(d: dict, layers: int) -> dict:
    out = {}
    old = {v for k, v in d.items() if k in LAYER_KEYS and isinstance(v, int) and v > layers}
    for k, v in d.items():
        if k == "per_layer_config" and isinstance(v, dict):
            out[k] = {i: c for i, c in v.items() if str(i).isdigit() and int(i) < layers}
        elif isinstance(v, dict) and k != "rope_parameters" and k != "rope_scaling":
            out[k] = _shrink(v, layers)
        elif k in LAYER_KEYS and isinstance(v, int) and v > layers:
            out[k] = layers
        elif isinstance(v, list) and len(v) in old:  # one entry per layer: keep the first ones
            out[k] = v[:layers]
        elif k in PER_LAYER_LISTS:
            continue
        elif k == "cross_attention_layers" and isinstance(v, list):
            out[k] = [i for i in v if i < layers][:1] or [layers - 1]
        elif k in ("vision_feature_layer",) and isinstance(v, int) and v >= 0:
            out[k] = min(v, layers - 1)
        elif k in ("vision_feature_layers", "intermediate_layers_indices", "out_indices", "deepstack_visual_indexes") \
                and isinstance(v, list):
            out[k] = [i for i in v if isinstance(i, int) and (i < 0 or i < layers)][:1] or [layers - 1]
        else:
            out[k] = v
    return out


def build_config(model_type: str, small: bool = True):
    """The default config of ``model_type``, shrunk to 2 layers per stack unless ``small=False``."""
    from transformers import AutoConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = _with_vision(AutoConfig.for_model(model_type))
        if not small:
            return config
        d = _shrink(copy.deepcopy(config.to_dict()), SMALL_LAYERS)
        d.pop("model_type", None)
        d.pop("transformers_version", None)
        return _pad_inside_vocab(AutoConfig.for_model(model_type, **d))


def _pad_inside_vocab(config):
    """Some defaults of transformers 5.17 put the pad id past the vocabulary (Idefics3's text
    config: an embedding that cannot be built); 5.24's do not. Such a pad id is dropped."""
    for sub in [config] + [getattr(config, k, None) for k in (getattr(config, "sub_configs", None) or {})]:
        pad, vocab = getattr(sub, "pad_token_id", None), getattr(sub, "vocab_size", None)
        if isinstance(pad, int) and isinstance(vocab, int) and pad >= vocab:
            sub.pad_token_id = None
    return config


def _with_vision(config):
    """A default config whose vision sub-config is left None (Gemma 4: the text-only variant) gets its
    config class's own default vision config, as its image-text checkpoints have."""
    for key, cls in (getattr(config, "sub_configs", None) or {}).items():
        if "vision" in key and getattr(config, key, None) is None and isinstance(cls, type):
            setattr(config, key, cls())
    return config


def zoo(small: bool = True, types=None):
    """(model_type, config or the exception that building it raised) for every type."""
    for t in types or image_text_types():
        try:
            yield t, build_config(t, small)
        except Exception as err:  # noqa: BLE001 - recorded: a type transformers cannot configure here
            yield t, err


# ---- the check the test set runs: spec, then a split plan, each succeeding or refusing --------

OUR_REFUSALS = ("RolesUnknown", "ImageTokensUnknown", "PlanError", "DeviceMapError")


def check(model_type: str, small: bool = True, gpus: str = "2x80GiB") -> dict:
    """One row: outcome 'plan' | 'refused' (with our specific message) | 'crash' | 'unbuildable'
    (transformers itself cannot configure or build the type here), plus what was checked."""
    import vlmlab
    from vlmlab.model.spec import build
    from vlmlab.plan.devicemap import owner_of

    row = {"model_type": model_type, "size": "small" if small else "published"}
    try:
        config = build_config(model_type, small)
        from vlmlab.model.catalog import build_meta_model

        modules = build_meta_model(config, include_buffers=True)
    except Exception as err:  # noqa: BLE001
        return {**row, "outcome": "unbuildable", "message": f"{type(err).__name__}: {str(err)[:200]}"}
    try:
        spec = build(model_type, config, "config", modules=modules)
        row.update(params=spec.num_parameters, image_tokens=spec.dims.image_tokens,
                   image_tokens_source=spec.image_tokens_source, roles={r: v for r, v in spec.roles.items()})
        plan = vlmlab.plan(spec, gpus, strategy="split")
    except Exception as err:  # noqa: BLE001
        name = type(err).__name__
        outcome = "refused" if name in OUR_REFUSALS else "crash"
        row = {**row, "outcome": outcome, "message": f"{name}: {str(err)[:1500]}"}
        if name == "ImageTokensUnknown":  # does it plan once told, as the message says?
            try:
                vlmlab.plan(spec, gpus, strategy="split", image_tokens=256)
                row["plans_with_image_tokens"] = True
            except Exception as again:  # noqa: BLE001
                row["plans_with_image_tokens"] = f"{type(again).__name__}: {str(again)[:200]}"
        return row
    dm = plan.replicas[0].device_map
    placed = {p: dm[owner_of(p, dm)] for p, *_ in spec.params if owner_of(p, dm) is not None}
    covered = len(placed) == len(spec.params) == len({n for n, _ in spec.modules.named_parameters()})
    by_component: dict = {}
    for pname, component, *_ in spec.params:
        if component in ("vision", "projector", "embeddings"):
            by_component.setdefault(component, set()).add(placed.get(pname))
    colocated = len(set().union(*by_component.values())) == 1 if by_component else True
    tied_ok = True
    for group in spec.tied:
        devices = {dm[k] for k in (owner_of(n, dm) for n in group) if k is not None}
        tied_ok &= len(devices) <= 1
    borrowed = not spec.image_tokens_source.startswith(("processor", "config", "override", "given",
                                                         "model image path"))
    return {**row, "outcome": "plan", "devices": len(plan.replicas[0].gpus), "covered": covered,
            "colocated": colocated, "tied_kept": tied_ok, "borrowed": borrowed}
