"""vlmlab.load(): the bundled captioner by name and folder, the registry, the double-load guard,
unload, safetensors-only loading, trust_remote_code, random weights, load(plan)."""
from __future__ import annotations

import gc
import shutil
import weakref

import pytest
import torch

import vlmlab
from vlmlab.assets import scenes as synth
from vlmlab.run.loading import AlreadyLoadedError, find, loaded, unload
from vlmlab.model.spec import BUNDLED, DEFAULT_MODEL

FOLDER = BUNDLED[DEFAULT_MODEL]
needs_bundled = pytest.mark.skipif(not (FOLDER / "config.json").exists(),
                                   reason="the bundled captioner is not trained yet (scripts/train_captioner.py)")


@pytest.fixture(autouse=True)
def empty_registry():
    unload()
    yield
    unload()


def _param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@needs_bundled
def test_load_bundled_by_name_and_by_folder():
    by_name = vlmlab.load()
    assert by_name.name == DEFAULT_MODEL and by_name.devices == ["cpu"] and by_name.dtype == "float32"
    assert type(by_name.model).__name__ == "LlavaForConditionalGeneration"
    assert type(by_name.processor).__name__ == "LlavaProcessor"
    assert not by_name.model.training and by_name.input_device == "cpu"
    assert vlmlab.load.__module__ == "vlmlab.run.loading" and loaded() == [by_name]
    n = _param_count(by_name.model)
    assert unload(by_name) == 1 and loaded() == []

    by_folder = vlmlab.load(str(FOLDER))
    assert by_folder.name == str(FOLDER) and _param_count(by_folder.model) == n
    assert find(DEFAULT_MODEL) is by_folder  # the folder and the name are one model
    assert str(FOLDER) in repr(by_folder) and "of weights" in by_folder._repr_html_()


@needs_bundled
def test_double_load_guard_and_force():
    first = vlmlab.load()
    with pytest.raises(AlreadyLoadedError) as err:
        vlmlab.load()
    msg = str(err.value)
    assert "already loaded" in msg and "force=True" in msg and "vlmlab.unload('vlmlab/tiny-captioner')" in msg
    with pytest.raises(AlreadyLoadedError, match="already loaded as 'vlmlab/tiny-captioner'"):
        vlmlab.load(str(FOLDER))  # the same weights by their folder
    assert loaded() == [first]
    second = vlmlab.load(force=True)
    assert second is not first and len(loaded()) == 2
    assert find(DEFAULT_MODEL) is second  # the most recent copy
    assert unload(DEFAULT_MODEL) == 2 and loaded() == []


@needs_bundled
def test_unload_frees_the_model():
    lm = vlmlab.load()
    ref = weakref.ref(lm.model)
    proc_ref = weakref.ref(lm.processor)
    assert unload() == 1
    gc.collect()
    assert loaded() == [] and lm.model is None and lm.processor is None
    assert ref() is None and proc_ref() is None
    assert unload() == 0


@needs_bundled
def test_unload_by_folder_and_by_loaded_model():
    lm = vlmlab.load()
    assert unload(str(FOLDER)) == 1 and loaded() == []
    lm = vlmlab.load()
    lm.unload()
    assert loaded() == []


@needs_bundled
def test_pickle_weights_need_allow_pickle(tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(FOLDER, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    ref = vlmlab.load()
    torch.save(ref.model.state_dict(), folder / "pytorch_model.bin")
    unload()
    with pytest.raises(OSError, match=r"only pickle files \(pytorch_model.bin\).*allow_pickle=True"):
        vlmlab.load(str(folder))
    assert loaded() == []
    lm = vlmlab.load(str(folder), allow_pickle=True)
    want = torch.load(folder / "pytorch_model.bin", weights_only=True)
    got = lm.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.items() if k in got)
    image = synth.make_dataset(1, seed=3)[0][0]
    assert vlmlab.caption(image, model=lm, progress=False).ok


@needs_bundled
def test_trust_remote_code_stays_off(monkeypatch, tmp_path):
    import transformers

    seen = []
    for cls_name in ("AutoModelForImageTextToText", "AutoProcessor", "AutoConfig"):
        cls = getattr(transformers, cls_name)
        real = cls.from_pretrained.__func__

        def spy(cls_, *args, _real=real, _name=cls_name, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code", "not passed"), kwargs.get("use_safetensors")))
            return _real(cls_, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    folder = tmp_path / "copy"  # a fresh folder: its config is not in spec()'s cache
    shutil.copytree(FOLDER, folder)
    vlmlab.load(str(folder))
    names = {name for name, _, _ in seen}
    assert {"AutoModelForImageTextToText", "AutoProcessor", "AutoConfig"} <= names
    assert all(trc in (False, "not passed") for _, trc, _ in seen), seen
    assert [s for name, _, s in seen if name == "AutoModelForImageTextToText"] == [True]  # safetensors only


def _tiny_llava_config():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=99, image_seq_length=16)


def test_random_weights_from_a_saved_config(tmp_path):
    folder = tmp_path / "tiny-llava"
    _tiny_llava_config().save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]  # no weights at all
    lm = vlmlab.load(str(folder), random_weights=True)
    assert lm.random_weights and lm.processor is None and "random weights" in repr(lm)
    params = list(lm.model.parameters())
    assert params and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
    weights = [p for n, p in lm.model.named_parameters() if n.endswith("q_proj.weight")]
    assert weights and all(0.005 < float(w.std()) < 0.05 for w in weights)  # N(0, 0.02), not zeros
    from vlmlab.model.dummy_inputs import caption_inputs

    inputs = caption_inputs(lm.plan._spec(), batch_size=2)
    with torch.no_grad():
        out = lm.model(**inputs)
    assert out.logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(out.logits).all()
    with pytest.raises(AlreadyLoadedError):
        vlmlab.load(str(folder), random_weights=True)


@needs_bundled
def test_load_a_plan():
    plan = vlmlab.plan(None, gpus="cpu", strategy="single", dtype="float32")
    lm = vlmlab.load(plan)
    assert lm.plan is plan and lm.device_map == plan.device_map and lm.dtype == "float32"
    unload()
    with pytest.raises(ValueError, match="re-plan"):
        vlmlab.load(plan, dtype="bfloat16")
    with pytest.raises(ValueError, match="replica 3 does not exist"):
        vlmlab.load(plan, replica=3)
    assert loaded() == []
