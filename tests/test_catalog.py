"""Tests for the built-in offline catalogue `vlmlab.catalog`.

Every entry is built on the meta device and its parameter count is checked
against the count published for the real checkpoint.  No network is used.
"""

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlmlab.model import catalog

# Published parameter counts, written out here independently of the catalogue so a
# mis-edited catalogue config is caught.  "Hub safetensors" = the Hugging Face model
# page's "Model size" figure, which the Hub computes from the checkpoint's safetensors
# metadata (tied weights are stored, and so counted, once).
PUBLISHED = [
    # llava-hf/llava-1.5-7b-hf, Hub safetensors: 7.06B (7,063,427,072)
    pytest.param("llava-1.5-7b", 7_063_427_072, id="llava-1.5-7b"),
    # llava-hf/llava-1.5-13b-hf, Hub safetensors: "13.4B params" (only the rounded figure)
    pytest.param("llava-1.5-13b", 13_400_000_000, id="llava-1.5-13b"),
    # llava-hf/llava-v1.6-mistral-7b-hf, Hub safetensors: 7.57B (7,566,747,648)
    pytest.param("llava-v1.6-mistral-7b", 7_566_747_648, id="llava-v1.6-mistral-7b"),
    # Qwen/Qwen2-VL-2B-Instruct, Hub safetensors: 2.21B (2,208,985,600)
    pytest.param("qwen2-vl-2b", 2_208_985_600, id="qwen2-vl-2b"),
    # Qwen/Qwen2-VL-7B-Instruct, model.safetensors.index.json total_size 16,582,751,232 B (bf16) / 2;
    # Hub safetensors: 8.29B
    pytest.param("qwen2-vl-7b", 8_291_375_616, id="qwen2-vl-7b"),
    # Qwen/Qwen2.5-VL-3B-Instruct, Hub safetensors: 3.75B (3,754,622,976)
    pytest.param("qwen2.5-vl-3b", 3_754_622_976, id="qwen2.5-vl-3b"),
    # Qwen/Qwen2.5-VL-7B-Instruct, Hub safetensors: 8.29B (8,292,166,656)
    pytest.param("qwen2.5-vl-7b", 8_292_166_656, id="qwen2.5-vl-7b"),
    # Qwen/Qwen2.5-VL-72B-Instruct, Hub safetensors: 73.4B (73,410,777,344)
    pytest.param("qwen2.5-vl-72b", 73_410_777_344, id="qwen2.5-vl-72b"),
    # HuggingFaceTB/SmolVLM-256M-Instruct, Hub safetensors: 256M (256,484,928)
    pytest.param("smolvlm-256m", 256_484_928, id="smolvlm-256m"),
    # HuggingFaceTB/SmolVLM-Instruct, Hub safetensors: 2.25B (2,246,272,880)
    pytest.param("smolvlm-2.2b", 2_246_272_880, id="smolvlm-2.2b"),
    # google/paligemma-3b-pt-224, Hub safetensors: 2.92B (2,923,466,480)
    pytest.param("paligemma-3b", 2_923_466_480, id="paligemma-3b"),
    # Salesforce/blip2-opt-2.7b, Hub safetensors: 3.74B (3,744,761,856)
    pytest.param("blip2-opt-2.7b", 3_744_761_856, id="blip2-opt-2.7b"),
    # OpenGVLab/InternVL3-2B-hf, Hub safetensors: 2.09B (2,088,957,440)
    pytest.param("internvl3-2b", 2_088_957_440, id="internvl3-2b"),
]

# The head, body and tail every family adapter needs: (vision tower, projector,
# token embeddings, decoder layer list, final norm, lm head).
MODULES = {
    "llava": ("model.vision_tower", "model.multi_modal_projector", "model.language_model.embed_tokens",
              "model.language_model.layers", "model.language_model.norm", "lm_head"),
    "qwen": ("model.visual", "model.visual.merger", "model.language_model.embed_tokens",
             "model.language_model.layers", "model.language_model.norm", "lm_head"),
    "idefics3": ("model.vision_model", "model.connector", "model.text_model.embed_tokens",
                 "model.text_model.layers", "model.text_model.norm", "lm_head"),
    "blip2": ("vision_model", "language_projection", "language_model.model.decoder.embed_tokens",
              "language_model.model.decoder.layers", "language_model.model.decoder.final_layer_norm",
              "language_model.lm_head"),
}
LAYOUT = {
    "llava-1.5-7b": "llava", "llava-1.5-13b": "llava", "llava-v1.6-mistral-7b": "llava",
    "paligemma-3b": "llava", "internvl3-2b": "llava",
    "qwen2-vl-2b": "qwen", "qwen2-vl-7b": "qwen", "qwen2.5-vl-3b": "qwen", "qwen2.5-vl-7b": "qwen",
    "qwen2.5-vl-72b": "qwen",
    "smolvlm-256m": "idefics3", "smolvlm-2.2b": "idefics3",
    "blip2-opt-2.7b": "blip2",
}

TOLERANCE = 0.01  # 1 %


def test_catalogue_lists_every_entry():
    assert catalog.names() == list(catalog.CATALOGUE)
    assert sorted(catalog.names()) == sorted(p.values[0] for p in PUBLISHED)
    assert set(LAYOUT) == set(catalog.names())
    hub_ids = [catalog.CATALOGUE[n]["hub_id"] for n in catalog.names()]
    assert len(set(h.lower() for h in hub_ids)) == len(hub_ids)
    for name in catalog.names():
        e = catalog.CATALOGUE[name]
        assert name == name.lower()
        assert {"name", "hub_id", "config", "published_params", "source"} <= set(e)
        assert e["name"] == name
        assert "/" in e["hub_id"] and e["source"]
        assert isinstance(e["config"]["model_type"], str)
        assert isinstance(e["config"].get("text_config"), dict), "transformers 5 layout: nested text_config"
        assert isinstance(e["config"].get("vision_config"), dict), "transformers 5 layout: nested vision_config"


@pytest.mark.parametrize("name, published", PUBLISHED)
def test_meta_build_matches_published_count(name, published):
    import torch

    e = catalog.entry(name)
    assert e["published_params"] == published, "catalogue and test disagree on the published count"

    t0 = time.perf_counter()
    config = catalog.build_config(name)
    model = catalog.build_meta_model(config)
    elapsed = time.perf_counter() - t0

    built = model.num_parameters()  # tied weights counted once, like the safetensors total
    diff = (built - published) / published
    print(f"\n{name}: {type(model).__name__} built {built:,} vs published {published:,} "
          f"({diff:+.4%}) in {elapsed:.2f} s")
    assert abs(diff) <= TOLERANCE, f"{name}: built {built:,} params, published {published:,} ({diff:+.2%})"

    # No real storage: every parameter is on meta; only the few small buffers (rotary
    # inv_freq, position_ids, ...) that checkpoints do not hold are real.
    params = list(model.parameters())
    assert params and all(p.device.type == "meta" for p in params)
    real_buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers() if b.device.type != "meta")
    assert real_buffer_bytes < 1 << 20, f"{real_buffer_bytes:,} bytes of real buffers"
    assert not model.training

    # Parameters get the checkpoint's dtype.
    dtype = getattr(torch, e["config"]["torch_dtype"])
    assert model.get_input_embeddings().weight.dtype == dtype

    # The module names the family adapters rely on.
    modules = dict(model.named_modules())
    for dotted in MODULES[LAYOUT[name]]:
        assert dotted in modules, f"{name}: no module {dotted}"
    layers = modules[MODULES[LAYOUT[name]][3]]
    assert isinstance(layers, torch.nn.ModuleList)
    assert len(layers) == config.get_text_config().num_hidden_layers
    assert model.get_input_embeddings() is modules[MODULES[LAYOUT[name]][2]]
    assert model.get_output_embeddings() is modules[MODULES[LAYOUT[name]][5]]
    assert model._no_split_modules


def test_tied_embeddings_follow_the_config():
    for name, tied in [("qwen2-vl-2b", True), ("qwen2.5-vl-3b", True), ("paligemma-3b", True),
                       ("blip2-opt-2.7b", True), ("qwen2.5-vl-7b", False), ("llava-1.5-7b", False),
                       ("smolvlm-256m", False), ("internvl3-2b", False)]:
        model = catalog.build_meta_model(catalog.build_config(name))
        is_tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        assert is_tied == tied, name


def test_build_meta_model_accepts_a_name_and_can_put_buffers_on_meta():
    model = catalog.build_meta_model("smolvlm-256m", include_buffers=True)
    assert all(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])


def test_build_config_does_not_touch_the_catalogue():
    import copy

    before = copy.deepcopy(catalog.CATALOGUE)
    config = catalog.build_config("llava-1.5-7b")
    config.text_config.num_hidden_layers = 1
    assert catalog.CATALOGUE == before
    assert config.name_or_path == "llava-hf/llava-1.5-7b-hf"
    assert config.image_token_id == 32000 and config.vision_feature_layer == -2
    assert config.text_config.vocab_size == 32064


@pytest.mark.parametrize("query, name", [
    ("llava-1.5-7b", "llava-1.5-7b"),
    ("  LLaVA-1.5-7B ", "llava-1.5-7b"),
    ("llava-hf/llava-1.5-7b-hf", "llava-1.5-7b"),
    ("LLAVA-HF/LLAVA-1.5-7B-HF", "llava-1.5-7b"),
    ("Qwen/Qwen2.5-VL-72B-Instruct", "qwen2.5-vl-72b"),
    ("qwen/qwen2-vl-2b-instruct", "qwen2-vl-2b"),
    ("HuggingFaceTB/SmolVLM-Instruct", "smolvlm-2.2b"),
    ("SmolVLM-256M-Instruct", "smolvlm-256m"),  # hub id without the org
    ("google/paligemma-3b-pt-224", "paligemma-3b"),
    ("Salesforce/blip2-opt-2.7b", "blip2-opt-2.7b"),
    ("OpenGVLab/InternVL3-2B-hf", "internvl3-2b"),
])
def test_entry_by_name_or_hub_id(query, name):
    e = catalog.entry(query)
    assert e is catalog.CATALOGUE[name]  # the same object every time
    assert e["name"] == name


@pytest.mark.parametrize("query, suggestion", [
    ("llava-1.5-7", "llava-1.5-7b"),
    ("qwen2-vl-2", "qwen2-vl-2b"),
    ("qwen25-vl-7b", "qwen2.5-vl-7b"),
    ("Qwen/Qwen2.5-VL-7B", "Qwen/Qwen2.5-VL-7B-Instruct"),
    ("smolvlm", "smolvlm-256m"),
])
def test_unknown_entry_suggests_close_matches(query, suggestion):
    with pytest.raises(KeyError) as err:
        catalog.entry(query)
    message = err.value.args[0]
    assert repr(query) in message and "Did you mean" in message
    assert repr(suggestion) in message
    assert "llava-1.5-7b" in message  # the known names are listed too


def test_unknown_entry_without_close_match():
    with pytest.raises(KeyError, match="not in the vlmlab catalogue") as err:
        catalog.entry("zzzz-nothing-like-it")
    assert "Did you mean" not in err.value.args[0]
    with pytest.raises(KeyError):
        catalog.build_config("gpt-5")
    with pytest.raises(TypeError):
        catalog.entry(None)


def test_module_imports_neither_torch_nor_transformers():
    path = Path(catalog.__file__)
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('vlmlab_catalog_probe', {str(path)!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "assert len(mod.names()) == 13, mod.names()\n"
        "bad = [m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert importlib.util.find_spec("transformers") is not None
