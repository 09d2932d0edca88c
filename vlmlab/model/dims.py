"""The sizes the memory model needs, read from a config and the model's own image path.

Widths and head counts come from the text and vision configs (a vision config given as a plain
dict, as remote code does, is read too; per-layer attributes of heterogeneous configs are read
per layer). Image tokens come from the family's processor at a given image size
(``vlmlab.model.image_tokens``), an override entry, or the caller; the KV cache layout per layer
from what the model's cache classes read (``introspect.kv_layout``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

from vlmlab.model.introspect import kv_layout, layer_value


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
    # tokens one image adds to the prompt (image tokens plus begin/end markers, row breaks)
    image_sequence: int = field(default=0, compare=False)
    # what each decoder layer caches (introspect.LayerCache), in layer order; empty: every layer full
    kv: tuple = field(default=(), compare=False, repr=False)
    image_size: tuple = field(default=(0, 0), compare=False)  # (width, height) the image tokens are for
    vision_rotary: bool = field(default=False, compare=False)  # the tower applies rotary embeddings (float32)
    # the projector's nn.Linear layers: in_features of the first, the widest out_features and how many are that wide
    # (a gated MLP has two): its temporaries over every image feature can outgrow the tower's (Idefics2: 14336)
    projector_in: int = field(default=0, compare=False)
    projector_width: int = field(default=0, compare=False)
    projector_wide: int = field(default=0, compare=False)


def sub_config(config, key):
    """``config.<key>`` as an object (remote code often keeps its vision config as a dict)."""
    sub = getattr(config, key, None)
    if isinstance(sub, dict):
        return SimpleNamespace(**sub)
    return sub if sub is not None else config


def text_config(config):
    if hasattr(config, "get_text_config"):
        try:
            return config.get_text_config()
        except Exception:  # noqa: BLE001 - remote configs with their own idea of sub-configs
            pass
    return sub_config(config, "text_config")


def _get(cfg, *keys, default=None):
    for k in keys:
        v = layer_value(cfg, k)
        if isinstance(v, (list, tuple)):  # a per-layer list: the largest value (the worst case)
            v = max((x for x in v if isinstance(x, (int, float))), default=None)
        if v is not None:
            return v
    if default is None:
        raise ValueError(f"config {type(cfg).__name__} has none of {keys}")
    return default


def read_dims(config, n_layers: int, cross_layers=None, image=None) -> Dims:
    """Dims of a model with ``n_layers`` decoder layers; ``image``: an image_tokens.ImageTokens
    (None: no image tokens known yet, counted as 0)."""
    tc = text_config(config)
    vc = sub_config(config, "vision_config")
    hidden = _get(tc, "hidden_size", "d_model", "n_embd", "dim")
    heads = _get(tc, "num_attention_heads", "n_head", "n_heads", "num_heads")
    kv = _get(tc, "num_key_value_heads", "n_kv_heads", default=heads) or heads
    head_dim = _get(tc, "head_dim", default=hidden // heads) or hidden // heads
    v_hidden = _get(vc, "embed_dim", "hidden_size", "width", default=hidden)
    layout = tuple(kv_layout(tc, n_layers, cross_layers))
    image_tokens = image.per_image if image is not None else 0
    vision_tokens = image.vision_tokens if image is not None else 0
    return Dims(hidden, _get(tc, "intermediate_size", "ffn_dim", "ffn_hidden_size", default=4 * hidden), n_layers,
                heads, kv, head_dim, _get(tc, "vocab_size", "padded_vocab_size"), v_hidden,
                _get(vc, "intermediate_size", default=4 * v_hidden),
                # Mllama's tower runs its global layers after the local ones, over the same tokens
                _get(vc, "num_hidden_layers", "depth", "layers", default=0) + _get(vc, "num_global_layers", default=0),
                _get(vc, "num_attention_heads", "num_heads", "heads", default=1),
                vision_tokens, image_tokens,
                image_sequence=image.sequence_tokens if image is not None else 0,
                kv=layout, image_size=tuple(image.image_size) if image is not None else (0, 0))
