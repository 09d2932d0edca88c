"""Family adapters: which modules of a VLM play which role.

Roles: ``vision`` (vision tower), ``projector`` (vision→text bridge), ``embeddings`` (token
embeddings), ``layers`` (the list of decoder layers), ``norm`` (final norm), ``head`` (LM head).
Each role lists candidate dotted names (modules or parameters); the ones present in a model's
module tree are used, so one adapter serves several transformers versions.

The vision tower, the projector and the token embeddings must share a device: the projector's
output is scattered into the embedded prompt, and a split there is the classic
"Expected all tensors to be on the same device" failure.
"""
from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("vision", "projector", "embeddings", "layers", "norm", "head")
COLOCATED = ("vision", "projector", "embeddings")


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    roles: dict[str, tuple[str, ...]]
    no_split: tuple[str, ...] = ()  # module class names never split (added to the model's own list)
    image_tokens: object = None  # callable(config) -> tokens per image at the default resolution
    architectures: tuple[str, ...] = ()  # matched against config.architectures (remote-code models)
    colocate: tuple[str, ...] = field(default=COLOCATED)
    keeps_vision_states: bool = False  # the tower returns every layer's hidden state (feature layer -2)
    merge: object = 1  # (int or callable(config)) vision-encoder tokens per language-model image token (Qwen merges 2x2, InternVL 4)

    def resolve(self, names: set[str]) -> dict[str, list[str]]:
        """Role -> the candidate names that exist in ``names`` (module and parameter names)."""
        return {role: [n for n in self.roles.get(role, ()) if n in names] for role in ROLES}


def _sub(config, key):
    sub = getattr(config, key, None)
    return sub if sub is not None else config


def _patches(vc, default_image=336, default_patch=14):
    size = getattr(vc, "image_size", default_image)
    size = size[0] if isinstance(size, (list, tuple)) else size
    return (size // getattr(vc, "patch_size", default_patch)) ** 2


def _llava_tokens(config):
    n = _patches(_sub(config, "vision_config"))
    return n if getattr(config, "vision_feature_select_strategy", "default") == "default" else n + 1


def _llava_next_tokens(config):
    # anyres at the largest default grid (2x2 tiles of 336) plus the base image and newline tokens
    n = _patches(_sub(config, "vision_config"))
    side = int(n**0.5)
    return n + 4 * n + 2 * side


def _qwen_tokens(config):
    vc = _sub(config, "vision_config")
    merge = getattr(vc, "spatial_merge_size", 2)
    patch = getattr(vc, "patch_size", 14)
    return (448 // patch) ** 2 // (merge * merge)  # a 448x448 image


def _idefics3_tokens(config):
    vc = _sub(config, "vision_config")
    per_tile = _patches(vc, 512, 16) // (getattr(config, "scale_factor", 2) ** 2)
    return per_tile * 5  # 2x2 tiles plus the global image at the default "longest_edge"


def _paligemma_tokens(config):
    return getattr(_sub(config, "text_config"), "num_image_tokens", None) or _patches(_sub(config, "vision_config"), 224, 14)


def _internvl_tokens(config):
    vc = _sub(config, "vision_config")
    size = getattr(vc, "image_size", 448)
    size = size[0] if isinstance(size, (list, tuple)) else size
    patch = getattr(vc, "patch_size", 14)
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    return int((size // patch) ** 2 * getattr(config, "downsample_ratio", 0.5) ** 2)


def _llm(prefix: str, head: str = "lm_head", norm: str = "norm", emb: str = "embed_tokens") -> dict:
    return {"embeddings": (f"{prefix}.{emb}",), "layers": (f"{prefix}.layers",),
            "norm": (f"{prefix}.{norm}",), "head": (head,)}


FAMILIES: list[Family] = [
    Family("llava", ("llava",), {
        "vision": ("model.vision_tower",),
        "projector": ("model.multi_modal_projector",),
        **_llm("model.language_model"),
    }, image_tokens=_llava_tokens, keeps_vision_states=True),
    Family("llava_next", ("llava_next",), {
        "vision": ("model.vision_tower",),
        "projector": ("model.multi_modal_projector", "model.image_newline"),
        **_llm("model.language_model"),
    }, image_tokens=_llava_next_tokens, keeps_vision_states=True),
    Family("qwen2_vl", ("qwen2_vl", "qwen2_5_vl"), {
        "vision": ("model.visual",),
        "projector": ("model.visual.merger",),
        **_llm("model.language_model"),
    }, image_tokens=_qwen_tokens, merge=4),
    Family("idefics3", ("idefics3", "smolvlm"), {
        "vision": ("model.vision_model",),
        "projector": ("model.connector",),
        **_llm("model.text_model"),
    }, image_tokens=_idefics3_tokens, merge=lambda config: getattr(config, "scale_factor", 2) ** 2),
    Family("paligemma", ("paligemma",), {
        "vision": ("model.vision_tower",),
        "projector": ("model.multi_modal_projector",),
        **_llm("model.language_model"),
    }, image_tokens=_paligemma_tokens),
    Family("internvl", ("internvl",), {
        "vision": ("model.vision_tower",),
        "projector": ("model.multi_modal_projector",),
        **_llm("model.language_model"),
    }, image_tokens=_internvl_tokens, merge=4),
    Family("blip2", ("blip-2",), {
        "vision": ("vision_model", "model.vision_model"),
        "projector": ("qformer", "query_tokens", "language_projection",
                      "model.qformer", "model.query_tokens", "model.language_projection"),
        "embeddings": ("language_model.model.decoder.embed_tokens", "language_model.model.decoder.embed_positions",
                       "model.language_model.decoder.embed_tokens", "model.language_model.decoder.embed_positions"),
        "layers": ("language_model.model.decoder.layers", "model.language_model.decoder.layers"),
        "norm": ("language_model.model.decoder.final_layer_norm", "model.language_model.decoder.final_layer_norm"),
        "head": ("language_model.lm_head", "lm_head"),
    }, image_tokens=lambda config: getattr(config, "num_query_tokens", 32)),
    # Remote-code families (trust_remote_code=True), by the module names their code uses.
    Family("internlm_xcomposer2", ("internlmxcomposer2",), {
        "vision": ("vit",), "projector": ("vision_proj",),
        **_llm("model", head="output", emb="tok_embeddings"),
    }, architectures=("InternLMXComposer2ForCausalLM",), no_split=("InternLM2DecoderLayer",),
        image_tokens=lambda config: 1225),
    Family("cogvlm", ("cogvlm",), {
        "vision": ("model.vision",), "projector": ("model.vision.linear_proj",),
        **_llm("model"),
    }, architectures=("CogVLMForCausalLM",), no_split=("CogVLMDecoderLayer", "TransformerLayer"),
        image_tokens=lambda config: 1227),
    Family("minicpmv", ("minicpmv",), {
        "vision": ("vpm",), "projector": ("resampler",),
        **_llm("llm.model", head="llm.lm_head"),
    }, architectures=("MiniCPMV",), no_split=("SiglipEncoderLayer", "Qwen2DecoderLayer", "LlamaDecoderLayer"),
        image_tokens=lambda config: getattr(config, "query_num", 64)),
]


def family_for(config, names: set[str] | None = None) -> Family:
    """The adapter for a config: by model_type, then by architectures, then by module names."""
    model_type = getattr(config, "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    archs = set(getattr(config, "architectures", None) or ())
    for fam in FAMILIES:
        if archs & set(fam.architectures):
            return fam
    if names is not None:
        for fam in FAMILIES:
            roles = fam.resolve(names)
            if all(roles[r] for r in ("vision", "embeddings", "layers")):
                return fam
    known = sorted({t for f in FAMILIES for t in f.model_types})
    raise ValueError(f"vlmlab has no family adapter for model_type {model_type!r} "
                     f"(architectures {sorted(archs)}). Supported model types: {', '.join(known)}.")
