"""vlmlab.spec: placement units, parameter table, dims and the ways a model name is resolved."""
from pathlib import Path

import pytest

import vlmlab
from vlmlab.model import catalog
from vlmlab.model.spec import BUNDLED, DEFAULT_MODEL, COMPONENTS, Dims, ModelSpec

LLM = "model.language_model"

# LLaVA-1.5-7B by hand (Vicuna-7B + CLIP ViT-L/14-336 + a 2-layer MLP projector):
EMB = 32064 * 4096  # 131,334,144: embed_tokens, and the untied lm_head of the same shape
ATTN = 4 * 4096 * 4096  # q, k, v, o without bias: 67,108,864
MLP = 3 * 4096 * 11008  # gate, up, down: 135,266,304
LAYER = ATTN + MLP + 2 * 4096  # + two RMSNorm weights = 202,383,360
PROJ_LINEAR = 1024 * 4096 + 4096 * 4096  # 20,971,520
PROJ = PROJ_LINEAR + 4096 + 4096  # + two biases = 20,979,712
VISION = 303_507_456  # CLIP ViT-L/14 at 336 px
VISION_LINEAR = 24 * (4 * 1024 * 1024 + 2 * 1024 * 4096)  # 24 layers of q,k,v,o + fc1,fc2: 301,989,888
TOTAL = VISION + PROJ + EMB + 32 * LAYER + 4096 + EMB  # = 7,063,427,072, the published count


@pytest.fixture(scope="module")
def llava():
    return vlmlab.spec("llava-1.5-7b")


@pytest.fixture(scope="module")
def paligemma():
    return vlmlab.spec("paligemma-3b")


@pytest.fixture(scope="module")
def qwen2b():
    return vlmlab.spec("qwen2-vl-2b")


def test_units_of_llava(llava):
    assert TOTAL == 7_063_427_072
    units = llava.units
    assert len(units) == 1 + 32 + 1 + 1
    first = units[0]
    assert first.name == "input" and first.layer is None
    # the co-located group first: vision tower, projector, token embeddings (+ the rotary buffers' module)
    assert first.members[:3] == ["model.vision_tower", "model.multi_modal_projector", f"{LLM}.embed_tokens"]
    assert set(first.members[3:]) <= {f"{LLM}.rotary_emb"}
    assert first.params == {"vision": VISION, "projector": PROJ, "embeddings": EMB}
    assert first.linear == {"vision": VISION_LINEAR, "projector": PROJ_LINEAR}  # embeddings are not nn.Linear
    for i, u in enumerate(units[1:33]):
        assert u.name == f"layer {i}" and u.layer == i
        assert u.members == [f"{LLM}.layers.{i}"]
        assert u.params == {"layers": LAYER}
        assert u.linear == {"layers": ATTN + MLP}  # the norms are not nn.Linear
    norm, head = units[33], units[34]
    assert (norm.name, norm.members, norm.params, norm.linear) == ("norm", [f"{LLM}.norm"], {"norm": 4096}, {})
    assert (head.name, head.members, head.params) == ("head", ["lm_head"], {"head": EMB})
    assert head.linear == {"head": EMB}


def test_llava_head_is_not_tied(llava):
    assert not llava.tied_head
    assert "lm_head" not in llava.units[0].members


@pytest.mark.parametrize("name", ["paligemma-3b", "qwen2-vl-2b"])
def test_tied_head_lives_with_the_embeddings(name):
    s = vlmlab.spec(name)
    assert s.tied_head
    assert [u.name for u in s.units][-1] == "norm"  # no separate head unit
    assert "lm_head" in s.units[0].members
    assert s.units[0].params["head"] == 0  # its weight is the embeddings', counted once
    assert s.params_by_component()["head"] == 0
    assert s.modules.lm_head.weight is s.modules.get_input_embeddings().weight


def test_qwen_merger_is_projector_but_not_a_separate_member(qwen2b):
    # the merger is inside the vision tower: one member, but its parameters count as projector
    assert qwen2b.units[0].members[:2] == ["model.visual", f"{LLM}.embed_tokens"]
    assert "model.visual.merger" not in qwen2b.units[0].members
    merger = sum(p.numel() for p in qwen2b.modules.model.visual.merger.parameters())
    assert qwen2b.units[0].params["projector"] == merger > 0
    visual = sum(p.numel() for p in qwen2b.modules.model.visual.parameters())
    assert qwen2b.units[0].params["vision"] == visual - merger


@pytest.mark.parametrize("name", ["llava-1.5-7b", "paligemma-3b", "qwen2-vl-2b", "blip2-opt-2.7b", "smolvlm-256m"])
def test_num_parameters_is_the_meta_models(name):
    s = vlmlab.spec(name)
    assert s.num_parameters == s.modules.num_parameters()  # tied weights once
    assert sum(s.params_by_component().values()) == s.num_parameters


def test_params_table(llava):
    rows = llava.params
    names = [r[0] for r in rows]
    assert len(names) == len(set(names)) == len(list(llava.modules.parameters()))
    assert set(names) == {n for n, _ in llava.modules.named_parameters()}
    assert sum(r[2] for r in rows) == TOTAL
    by_component = dict.fromkeys(COMPONENTS, 0)
    for _, component, numel, _, unit in rows:
        by_component[component] += numel
        assert any(unit is u for u in llava.units)
    assert by_component == llava.params_by_component()
    assert by_component["layers"] == 32 * LAYER and by_component["head"] == EMB and by_component["other"] == 0
    table = {r[0]: r for r in rows}
    _, component, numel, linear, unit = table[f"{LLM}.layers.7.mlp.down_proj.weight"]
    assert (component, numel, linear, unit.layer) == ("layers", 11008 * 4096, True, 7)
    _, component, numel, linear, unit = table[f"{LLM}.layers.7.input_layernorm.weight"]
    assert (component, numel, linear) == ("layers", 4096, False)
    assert table["model.multi_modal_projector.linear_1.bias"][1:4] == ("projector", 4096, False)
    assert table["lm_head.weight"][1:4] == ("head", EMB, True)
    assert sum(r[2] for r in rows if r[3]) == sum(sum(u.linear.values()) for u in llava.units)


def test_dims_of_llava(llava):
    assert llava.dims == Dims(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, head_dim=128,
                              vocab=32064, vision_hidden=1024, vision_intermediate=4096, vision_layers=24,
                              vision_heads=16,
                              vision_tokens=577,  # (336/14)^2 patches + the CLS token
                              image_tokens=576)  # the CLS token is dropped ("default" feature select)


def test_dims_with_grouped_query_attention_and_merging(qwen2b):
    d = qwen2b.at((448, 448)).dims  # image tokens depend on the image size (default: a 1024x768 photo)
    assert (d.hidden, d.layers, d.heads, d.kv_heads, d.head_dim, d.vocab) == (1536, 28, 12, 2, 128, 151936)
    assert d.image_tokens == 256  # a 448x448 image: (448/14)^2 = 1024 patches, merged 2x2
    assert d.vision_tokens == 1024  # the encoder sees them before merging
    photo = qwen2b.dims  # 1024x768 -> 1036x756 (multiples of 28): 37 x 27 merged tokens
    assert (photo.image_size, photo.image_tokens, photo.vision_tokens) == ((1024, 768), 999, 4 * 999)


def test_spec_metadata_and_display(llava):
    assert llava.source == "catalogue" and llava.hub_id == "llava-hf/llava-1.5-7b-hf" and llava.path is None
    assert llava.name == "llava-1.5-7b"
    assert all(p.device.type == "meta" for p in llava.modules.parameters())
    assert "7.06B params" in repr(llava) and "32 layers" in repr(llava)
    html = llava._repr_html_()
    assert "llava-1.5-7b" in html and "32 decoder layers" in html and "576 image tokens" in html
    assert "model.vision_tower" in html


def test_spec_resolution_and_cache(llava):
    assert vlmlab.spec("llava-1.5-7b") is llava  # built once
    assert vlmlab.spec(llava) is llava  # a ModelSpec passes through
    assert isinstance(llava, ModelSpec)
    by_hub_id = vlmlab.spec("llava-hf/llava-1.5-7b-hf")
    assert by_hub_id.name == "llava-1.5-7b" and by_hub_id.source == "catalogue"
    assert by_hub_id.num_parameters == TOTAL


def test_unknown_name_lists_the_catalogue():
    with pytest.raises(KeyError) as err:
        vlmlab.spec("no-such-vlm")
    msg = err.value.args[0]
    assert "'no-such-vlm' is not a folder nor a catalogue model" in msg
    for name in catalog.names():
        assert name in msg


def test_wrong_type():
    with pytest.raises(TypeError, match="model must be a name, a folder or a ModelSpec, not int"):
        vlmlab.spec(123)


def test_folder_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        vlmlab.spec(str(tmp_path))


def test_local_folder(tmp_path):
    config = catalog.build_config("llava-1.5-7b")
    t = config.text_config
    t.hidden_size, t.intermediate_size, t.num_hidden_layers = 64, 128, 3
    t.num_attention_heads = t.num_key_value_heads = 4
    v = config.vision_config
    v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads = 32, 64, 2, 2
    config.save_pretrained(tmp_path)
    s = vlmlab.spec(Path(tmp_path))  # os.PathLike works as well as str
    assert s.source == "folder" and s.path == str(tmp_path.resolve())
    assert s.family.name == "llava"
    assert (s.dims.hidden, s.dims.layers, s.dims.vision_hidden) == (64, 3, 32)
    assert len(s.units) == 1 + 3 + 2
    assert s.num_parameters == s.modules.num_parameters()
    assert s.units[-1].params == {"head": 32064 * 64}


def test_hub_id_offline_is_a_clear_oserror(monkeypatch):
    import huggingface_hub.constants

    # transformers asks huggingface_hub, which read HF_HUB_OFFLINE at import time: set both, so
    # nothing tries the network (and the test cannot hang on it)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError) as err:
        vlmlab.spec("some-org/some-vlm-that-is-not-here")
    msg = str(err.value)
    assert "'some-org/some-vlm-that-is-not-here'" in msg
    assert "Offline" in msg and "catalogue" in msg
    assert "llava-1.5-7b" in msg and "qwen2-vl-2b" in msg


@pytest.mark.skipif(not (BUNDLED[DEFAULT_MODEL] / "config.json").exists(),
                    reason="the bundled tiny captioner is not trained yet")
def test_bundled_default_model():
    s = vlmlab.spec()
    assert s.name == DEFAULT_MODEL == vlmlab.DEFAULT_MODEL == "vlmlab/tiny-captioner"
    assert s.source == "bundled" and Path(s.path) == BUNDLED[DEFAULT_MODEL]
    assert vlmlab.spec("tiny-captioner") is s or vlmlab.spec("tiny-captioner").name == DEFAULT_MODEL
    assert s.num_parameters == s.modules.num_parameters() > 0
    assert s.units[0].name == "input" and s.dims.layers >= 1
    assert all(s.roles[r] for r in ("vision", "embeddings", "layers"))
