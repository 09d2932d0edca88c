"""Overrides for models whose roles introspection cannot read by itself.

Every transformers model type is read from the model (``vlmlab.model.introspect``); what is here
is data for remote-code models (``trust_remote_code=True``) whose vision tower and projector have
names transformers does not use, and which ship no processor class transformers knows: the
candidate module names per role and the image tokens their published code writes per image.
Their code scatters image features into the prompt without moving them between devices, so the
vision tower, projector and token embeddings must share one device (``moves_image_features``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("vision", "projector", "embeddings", "layers", "norm", "head")
COLOCATED = ("vision", "projector", "embeddings")


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...] = ()
    roles: dict[str, tuple[str, ...]] = field(default_factory=dict)  # role -> candidate dotted names
    no_split: tuple[str, ...] = ()  # module class names never split (added to the model's own list)
    architectures: tuple[str, ...] = ()  # matched against config.architectures
    image_tokens: int | None = None  # tokens per image the published code writes, when fixed
    image_tokens_field: str | None = None  # ... or the config field that states them
    colocate: tuple[str, ...] = COLOCATED
    keeps_vision_states: bool = False  # the tower returns every layer's hidden state (a feature layer is picked)
    moves_image_features: bool = True  # the model's code moves image features to the embeddings' device
    override: bool = False  # from the table below, not read from transformers

    def resolve(self, names: set[str]) -> dict[str, list[str]]:
        """Role -> the candidate names that exist in ``names`` (module and parameter names)."""
        return {role: [n for n in self.roles.get(role, ()) if n in names] for role in ROLES}


def _llm(prefix: str, head: str = "lm_head", norm: str = "norm", emb: str = "embed_tokens") -> dict:
    return {"embeddings": (f"{prefix}.{emb}",), "layers": (f"{prefix}.layers",),
            "norm": (f"{prefix}.{norm}",), "head": (head,)}


def _remote(name, model_types, architectures, roles, no_split, **kw) -> Family:
    return Family(name, model_types, roles, no_split, architectures, moves_image_features=False, override=True, **kw)


OVERRIDES: list[Family] = [
    _remote("internlm_xcomposer2", ("internlmxcomposer2",), ("InternLMXComposer2ForCausalLM",),
            {"vision": ("vit",), "projector": ("vision_proj",), **_llm("model", head="output", emb="tok_embeddings")},
            ("InternLM2DecoderLayer",), image_tokens=1225),  # 490 px / 14 = 35 x 35 patches
    # ShareCaptioner v1 (InternLM-XComposer v1 code): EVA ViT + Q-Former with 32 queries
    _remote("sharecaptioner", ("sharecaptioner", "internlmxcomposer"), ("InternLMXComposerForCausalLM",),
            {"vision": ("visual_encoder",), "projector": ("Qformer", "query_tokens", "ln_vision", "internlm_proj",
                                                          "flag_image_start", "flag_image_end"),
             **_llm("internlm_model.model", head="internlm_model.lm_head")},
            ("InternLMDecoderLayer", "BertLayer"), image_tokens=32),
    _remote("cogvlm", ("cogvlm",), ("CogVLMForCausalLM",),
            {"vision": ("model.vision",), "projector": ("model.vision.linear_proj",), **_llm("model")},
            ("CogVLMDecoderLayer", "TransformerLayer"), image_tokens=1227),  # 35 x 35 patches + boi/eoi
    _remote("cogvlm2", ("cogvlm2",), ("CogVLM2ForCausalLM",),
            {"vision": ("model.vision",), "projector": ("model.vision.linear_proj", "model.vision.conv"), **_llm("model")},
            ("CogVLMDecoderLayer", "TransformerLayer"), image_tokens=2306),  # 1344 px: 96 x 96 patches, conv 2x2, + boi/eoi
    _remote("cogagent", ("cogagent",), ("CogAgentForCausalLM",),
            {"vision": ("model.vision",), "projector": ("model.vision.linear_proj", "model.cross_vision"),
             **_llm("model")},
            ("CogAgentDecoderLayer", "TransformerLayer"), image_tokens=1227),
    _remote("minicpmv", ("minicpmv",), ("MiniCPMV",),
            {"vision": ("vpm",), "projector": ("resampler",), **_llm("llm.model", head="llm.lm_head")},
            ("SiglipEncoderLayer", "Qwen2DecoderLayer", "LlamaDecoderLayer"), image_tokens_field="query_num"),
    _remote("omnilmm", ("omnilmm",), ("OmniLMMForCausalLM",),
            {"vision": ("model.vision_tower",), "projector": ("model.resampler",), **_llm("model")},
            ("MistralDecoderLayer", "Block"), image_tokens_field="num_query"),
]


def override_for(config, names: set[str] | None = None) -> Family | None:
    """The override entry for a config: by model_type, then architectures, then module names."""
    model_type = getattr(config, "model_type", None)
    for fam in OVERRIDES:
        if model_type in fam.model_types:
            return fam
    archs = set(getattr(config, "architectures", None) or ())
    for fam in OVERRIDES:
        if archs & set(fam.architectures):
            return fam
    if names is not None:
        for fam in OVERRIDES:
            roles = fam.resolve(names)
            if all(roles[r] for r in ("vision", "embeddings", "layers")):
                return fam
    return None


def family_for(config, names: set[str] | None = None, native: bool = True) -> Family:
    """The override entry, else a family read from transformers: named by its model_type, keeping
    every hidden state of the tower when the config selects a feature layer (LLaVA's -2)."""
    fam = override_for(config, names)
    if fam is not None:
        return fam
    model_type = getattr(config, "model_type", None) or "unknown"
    layer = getattr(config, "vision_feature_layer", None)  # -1 is the last state only; -2 or a list asks for all
    # Mllama's tower keeps every state and concatenates the intermediate_layers_indices ones
    picked = getattr(getattr(config, "vision_config", None), "intermediate_layers_indices", None)
    keeps = (layer is not None and layer != -1) or bool(picked)
    return Family(str(model_type), (str(model_type),), keeps_vision_states=keeps, moves_image_features=native)


def known_overrides() -> list[str]:
    return sorted({t for f in OVERRIDES for t in f.model_types})
