"""Roles of each family: the vision tower, projector, embeddings, layers, norm and head.

Catalogue families are read from the catalogue models built on the meta device (no table: see
vlmlab.model.introspect); the remote-code overrides (InternLM-XComposer2, ShareCaptioner, CogVLM,
MiniCPM-V, OmniLMM) on small torch module trees that use the same module names as their published
code, with a fake config.
"""
from types import SimpleNamespace

import pytest
import torch.nn as nn

import vlmlab
from vlmlab.model.families import COLOCATED, OVERRIDES, ROLES, family_for
from vlmlab.model.spec import build

LLM = "model.language_model"
# catalogue name -> (model type, {role: expected names}, image tokens per 448x448 image)
# Image tokens by hand: LLaVA-1.5 (336/14)^2 = 576; LLaVA-NeXT anyres 576 base + 4*576 tiles + 2*24 newlines
# = 2928; Qwen2-VL (448/14)^2 / (2*2 merge) = 256; PaliGemma-224: (224/14)^2 = 256; BLIP-2: 32 query tokens;
# InternVL3: (448/14)^2 * 0.5^2 = 256 (one tile). SmolVLM: its processor first resizes the longest edge to
# 4 tiles (2048 px for the 512-px 256M, 1536 for the 384-px 2.2B), then cuts 4x4 tiles + the global image:
# 17 x (512/16)^2 / 4^2 = 17 x 64 = 1088, and 17 x 27^2 / 3^2 = 17 x 81 = 1377.
_LLAVA = {"vision": ["model.vision_tower"], "projector": ["model.multi_modal_projector"],
          "embeddings": [f"{LLM}.embed_tokens"], "layers": [f"{LLM}.layers"], "norm": [f"{LLM}.norm"],
          "head": ["lm_head"]}
_QWEN = {**_LLAVA, "vision": ["model.visual"], "projector": ["model.visual.merger"]}
_IDEFICS = {"vision": ["model.vision_model"], "projector": ["model.connector"],
            "embeddings": ["model.text_model.embed_tokens"], "layers": ["model.text_model.layers"],
            "norm": ["model.text_model.norm"], "head": ["lm_head"]}
_BLIP2 = {"vision": ["vision_model"], "projector": ["qformer", "language_projection", "query_tokens"],
          "embeddings": ["language_model.model.decoder.embed_tokens", "language_model.model.decoder.embed_positions"],
          "layers": ["language_model.model.decoder.layers"], "norm": ["language_model.model.decoder.final_layer_norm"],
          "head": ["language_model.lm_head"]}
CATALOGUE = {
    "llava-1.5-7b": ("llava", _LLAVA, 576),
    "llava-1.5-13b": ("llava", _LLAVA, 576),
    "llava-v1.6-mistral-7b": ("llava_next",
                              {**_LLAVA, "projector": ["model.multi_modal_projector", "model.image_newline"]}, 2928),
    "qwen2-vl-2b": ("qwen2_vl", _QWEN, 256),
    "qwen2-vl-7b": ("qwen2_vl", _QWEN, 256),
    "qwen2.5-vl-3b": ("qwen2_5_vl", _QWEN, 256),
    "qwen2.5-vl-7b": ("qwen2_5_vl", _QWEN, 256),
    # qwen2.5-vl-72b: same family and names as qwen2.5-vl-7b; planned once in test_planner.py
    "smolvlm-256m": ("idefics3", _IDEFICS, 1088),
    "smolvlm-2.2b": ("idefics3", _IDEFICS, 1377),
    "paligemma-3b": ("paligemma", _LLAVA, 256),
    "blip2-opt-2.7b": ("blip-2", _BLIP2, 32),
    "internvl3-2b": ("internvl", _LLAVA, 256),
}
DECODER_LAYER = {"llava-1.5-7b": "LlamaDecoderLayer", "llava-v1.6-mistral-7b": "MistralDecoderLayer",
                 "qwen2-vl-2b": "Qwen2VLDecoderLayer", "qwen2.5-vl-3b": "Qwen2_5_VLDecoderLayer",
                 "smolvlm-256m": "LlamaDecoderLayer", "paligemma-3b": "GemmaDecoderLayer",
                 "blip2-opt-2.7b": "OPTDecoderLayer", "internvl3-2b": "Qwen2DecoderLayer"}


@pytest.fixture(scope="module")
def specs():
    """Every catalogue spec used here, built once (vlmlab.spec caches them for the session too)."""
    return {name: vlmlab.spec(name) for name in CATALOGUE}


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_catalogue_family_roles(specs, name):
    family, roles, image_tokens = CATALOGUE[name]
    s = specs[name]
    assert s.family.name == family
    assert s.roles == {r: roles[r] for r in ROLES}
    names = s.module_names()
    for role, found in s.roles.items():
        assert found and set(found) <= names, role
    modules = dict(s.modules.named_modules())
    (layers,) = s.roles["layers"]
    assert isinstance(modules[layers], nn.ModuleList)
    assert len(modules[layers]) == s.config.get_text_config().num_hidden_layers == s.dims.layers
    assert s.at((448, 448)).dims.image_tokens == image_tokens


@pytest.mark.parametrize("name", list(DECODER_LAYER))
def test_decoder_layers_are_never_split(specs, name):
    s = specs[name]
    (layers,) = s.roles["layers"]
    layer0 = dict(s.modules.named_modules())[f"{layers}.0"]
    assert type(layer0).__name__ == DECODER_LAYER[name]
    assert DECODER_LAYER[name] in s.no_split


def test_family_is_the_model_type_unless_overridden(specs):
    assert family_for(specs["llava-1.5-7b"].config).name == "llava"
    assert family_for(specs["qwen2.5-vl-7b"].config).name == "qwen2_5_vl"  # no table shared with qwen2_vl
    assert not family_for(specs["qwen2.5-vl-7b"].config).override


def test_every_override_keeps_the_input_group_together():
    for fam in OVERRIDES:
        assert fam.colocate == COLOCATED == ("vision", "projector", "embeddings")
        assert set(fam.roles) == set(ROLES), fam.name
        assert fam.override and not fam.moves_image_features  # remote code: features stay where they are
    assert len({f.name for f in OVERRIDES}) == len(OVERRIDES)


def test_llava_keeps_every_vision_state(specs):
    assert specs["llava-1.5-7b"].family.keeps_vision_states  # the config picks a feature layer (-2)
    assert not specs["qwen2-vl-2b"].family.keeps_vision_states


# ---- remote-code families on synthetic module trees ---------------------------------------------

D = 8  # hidden size of the synthetic trees


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.Linear(D, D, bias=False)
        self.feed_forward = nn.Linear(D, 2 * D)
        self.attention_norm = nn.LayerNorm(D)


def block(cls_name: str):
    """A decoder-layer class named as in the family's remote code (no-split is by class name)."""
    return type(cls_name, (_Block,), {})


def tree(entries: dict) -> nn.Module:
    """A module tree from {dotted name: module or parameter}, with plain containers in between."""
    root = nn.Module()
    for dotted, mod in entries.items():
        *parents, leaf = dotted.split(".")
        parent = root
        for p in parents:
            if p not in parent._modules:
                parent.add_module(p, nn.Module())
            parent = parent._modules[p]
        if isinstance(mod, nn.Parameter):
            parent.register_parameter(leaf, mod)
        else:
            parent.add_module(leaf, mod)
    return root


def fake_config(model_type=None, architectures=None, **kw):
    return SimpleNamespace(model_type=model_type, architectures=architectures, hidden_size=D, num_attention_heads=2,
                           num_key_value_heads=1, intermediate_size=2 * D, vocab_size=50, **kw)


def xcomposer2_tree(n_layers=3):
    cls = block("InternLM2DecoderLayer")
    return tree({
        "vit": nn.Sequential(nn.Linear(12, 12), nn.LayerNorm(12)),
        "vision_proj": nn.Sequential(nn.Linear(12, D), nn.GELU(), nn.Linear(D, D)),
        "model.tok_embeddings": nn.Embedding(50, D),
        "model.layers": nn.ModuleList(cls() for _ in range(n_layers)),
        "model.norm": nn.LayerNorm(D),
        "output": nn.Linear(D, 50, bias=False),
    })


class _CogVision(nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer = nn.Linear(12, 12)
        self.linear_proj = nn.Linear(12, D)


def cogvlm_tree(n_layers=2):
    cls = block("CogVLMDecoderLayer")
    return tree({
        "model.vision": _CogVision(),
        "model.embed_tokens": nn.Embedding(50, D),
        "model.layers": nn.ModuleList(cls() for _ in range(n_layers)),
        "model.norm": nn.LayerNorm(D),
        "lm_head": nn.Linear(D, 50, bias=False),
    })


def minicpmv_tree(n_layers=2, tie=False):
    cls = block("Qwen2DecoderLayer")
    t = tree({
        "vpm": nn.Sequential(nn.Linear(12, 12)),
        "resampler": nn.Linear(12, D),
        "llm.model.embed_tokens": nn.Embedding(50, D),
        "llm.model.layers": nn.ModuleList(cls() for _ in range(n_layers)),
        "llm.model.norm": nn.LayerNorm(D),
        "llm.lm_head": nn.Linear(D, 50, bias=False),
    })
    if tie:
        t.llm.lm_head.weight = t.llm.model.embed_tokens.weight
    return t


REMOTE = {
    # family: (tree factory, model_type, architectures, roles, no-split class, image tokens)
    "internlm_xcomposer2": (xcomposer2_tree, "internlmxcomposer2", ["InternLMXComposer2ForCausalLM"], {
        "vision": ["vit"], "projector": ["vision_proj"], "embeddings": ["model.tok_embeddings"],
        "layers": ["model.layers"], "norm": ["model.norm"], "head": ["output"]}, "InternLM2DecoderLayer", 1225),
    "cogvlm": (cogvlm_tree, "cogvlm", ["CogVLMForCausalLM"], {
        "vision": ["model.vision"], "projector": ["model.vision.linear_proj"], "embeddings": ["model.embed_tokens"],
        "layers": ["model.layers"], "norm": ["model.norm"], "head": ["lm_head"]}, "CogVLMDecoderLayer", 1227),
    "minicpmv": (minicpmv_tree, "minicpmv", ["MiniCPMV"], {
        "vision": ["vpm"], "projector": ["resampler"], "embeddings": ["llm.model.embed_tokens"],
        "layers": ["llm.model.layers"], "norm": ["llm.model.norm"], "head": ["llm.lm_head"]}, "Qwen2DecoderLayer", 64),
}


@pytest.mark.parametrize("family", list(REMOTE))
@pytest.mark.parametrize("detect", ["model_type", "architectures", "names"])
def test_remote_code_family(family, detect):
    make, model_type, archs, roles, no_split, image_tokens = REMOTE[family]
    config = {"model_type": fake_config(model_type=model_type),
              "architectures": fake_config(model_type="custom_remote", architectures=archs),
              "names": fake_config()}[detect]
    modules = make()
    s = build("my-remote-model", config, "folder", modules=modules)
    assert s.family.name == family
    assert s.roles == roles
    assert no_split in s.no_split  # from the adapter: remote code often lists no _no_split_modules
    assert s.dims.layers == len(dict(modules.named_modules())[roles["layers"][0]])
    assert s.dims.image_tokens == image_tokens
    assert s.num_parameters == sum(p.numel() for p in modules.parameters())
    # the input unit holds the vision tower, the projector (unless nested in the tower) and the embeddings
    first = s.units[0]
    assert first.name == "input"
    for m in roles["vision"] + roles["embeddings"]:
        assert m in first.members
    assert [u.layer for u in s.units[1:-2]] == list(range(s.dims.layers))
    assert s.units[-2].members == roles["norm"] and s.units[-1].members == roles["head"]


def test_cogvlm_projector_inside_the_vision_tower():
    s = build("cog", fake_config("cogvlm"), "folder", modules=cogvlm_tree())
    # the projector is counted as projector, not vision, but the unit names the tower once
    assert s.units[0].members == ["model.vision", "model.embed_tokens"]
    by = s.params_by_component()
    assert by["projector"] == 12 * D + D  # linear_proj: weight 12x8 + bias 8
    assert by["vision"] == 12 * 12 + 12  # transformer: weight 12x12 + bias 12


def test_minicpmv_tied_head():
    s = build("mini", fake_config("minicpmv"), "folder", modules=minicpmv_tree(tie=True))
    assert s.tied_head
    assert [u.name for u in s.units] == ["input", "layer 0", "layer 1", "norm"]
    assert "llm.lm_head" in s.units[0].members
    untied = build("mini", fake_config("minicpmv"), "folder", modules=minicpmv_tree(tie=False))
    assert not untied.tied_head and untied.units[-1].name == "head"
    assert untied.num_parameters - s.num_parameters == 50 * D  # the head's own 50x8 weight


def test_remote_code_spec_plans_on_a_virtual_box():
    s = build("cog", fake_config("cogvlm"), "folder", modules=cogvlm_tree(n_layers=4))
    p = vlmlab.plan(s, "2xcpu:1GiB", strategy="split")
    # vision tower (with its projector) and embeddings on the first device, the layers in order after
    assert p.device_map["model.vision"] == p.device_map["model.embed_tokens"]
    assert set(p.device_map) == {"model.vision", "model.embed_tokens", "model.norm", "lm_head",
                                 *(f"model.layers.{i}" for i in range(4))}


def test_unknown_family_is_a_clear_error():
    modules = tree({"encoder": nn.Linear(4, 4), "decoder.layers": nn.ModuleList([nn.Linear(4, 4)])})
    config = fake_config(model_type="mystery", architectures=["MysteryForCausalLM"])
    with pytest.raises(ValueError) as err:
        build("mystery-model", config, "folder", modules=modules)
    msg = str(err.value)
    assert "no family adapter for model_type 'mystery'" in msg
    assert "MysteryForCausalLM" in msg
    for known in ("llava", "qwen2_vl", "idefics3", "paligemma", "blip-2", "cogvlm", "minicpmv"):
        assert known in msg
    assert "roles={'vision': [...], 'embeddings': [...], 'layers': [...]}" in msg  # how to say it
    named = build("mystery-model", config, "folder", modules=modules,
                  roles={"vision": ["encoder"], "layers": ["decoder.layers"], "embeddings": ["encoder"]},
                  image_tokens=10)
    assert named.roles["vision"] == ["encoder"] and named.dims.image_tokens == 10


def test_known_family_with_missing_modules():
    modules = tree({"model.embed_tokens": nn.Embedding(5, D), "model.layers": nn.ModuleList([block("X")()])})
    with pytest.raises(ValueError) as err:
        build("broken-cog", fake_config("cogvlm"), "folder", modules=modules)
    assert "the cogvlm adapter found no vision module" in str(err.value)
    assert "['model']" in str(err.value)  # its top-level modules, to see what it has instead
