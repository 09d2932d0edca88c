"""greedy_without_sync: generate's greedy loop without a host sync per step gives generate's tokens
(every family goes through it in test_families_caption, since caption_batch uses it)."""
from __future__ import annotations

import pytest

from vlmlab.run import decode_loop
from tests.conftest import tiny_inputs


def _run(model, inputs, **kw):
    import torch

    with torch.inference_mode():
        return model.generate(**inputs, do_sample=False, **kw)


def test_same_tokens_as_generate_with_rows_stopping_at_different_steps(tiny):
    ms, model = tiny
    inputs = tiny_inputs(ms)
    prompt = inputs["input_ids"].shape[1]
    free = _run(model, inputs, max_new_tokens=6, min_new_tokens=6)[:, prompt:]
    stop = int(free[0, 2])  # row 0 stops after 3 tokens; the others when (if) they write it
    pad = next(t for t in range(5, 1000) if t not in free.tolist()[0] + [stop])
    kw = dict(max_new_tokens=2 * decode_loop.CHECK_EVERY + 3, eos_token_id=stop, pad_token_id=pad)
    plain = _run(model, inputs, **kw)
    lean = _run(model, inputs, custom_generate=decode_loop.greedy_without_sync, **kw)
    n = min(plain.shape[1], lean.shape[1])
    assert (plain[0, prompt:prompt + 3] == free[0, :3]).all() and plain[0, prompt + 3:].eq(pad).all()
    assert lean[:, :n].equal(plain[:, :n])
    assert lean[:, n:].eq(pad).all() and plain[:, n:].eq(pad).all()  # only trailing pad columns may differ
    assert lean.shape[1] - plain.shape[1] < decode_loop.CHECK_EVERY


def test_stops_at_the_next_check_once_every_row_has_stopped(tiny):
    ms, model = tiny
    inputs = tiny_inputs(ms, batch=2)
    prompt = inputs["input_ids"].shape[1]
    first = _run(model, inputs, max_new_tokens=1)[:, prompt]
    kw = dict(max_new_tokens=5 * decode_loop.CHECK_EVERY, eos_token_id=first.tolist(), pad_token_id=0)
    lean = _run(model, inputs, custom_generate=decode_loop.greedy_without_sync, **kw)
    assert lean.shape[1] == prompt + decode_loop.CHECK_EVERY  # both rows stopped at step 1: one check later it ends
    assert lean[:, prompt + 1:].eq(0).all()


def test_without_sync_only_where_it_applies(tiny):
    _, model = tiny
    assert decode_loop.without_sync(model, {"do_sample": False})["custom_generate"] is decode_loop.greedy_without_sync
    for kw in ({"do_sample": True}, {"num_beams": 2}, {"streamer": object()}, {"custom_generate": len}):
        assert decode_loop.without_sync(model, kw) == kw
    own = type("RemoteCodeModel", (type(model),), {"generate": lambda self, **kw: None})
    assert "custom_generate" not in decode_loop.without_sync(own.__new__(own), {})


def test_refuses_sampling(tiny):
    ms, model = tiny
    with pytest.raises(ValueError, match="decodes greedily"):
        _run(model, tiny_inputs(ms, 1), max_new_tokens=2, custom_generate=decode_loop.greedy_without_sync,
             num_beams=2)


def _batch(folder, padded=True):
    import numpy as np
    from PIL import Image

    from vlmlab.model.saved_processor import load_processor
    from vlmlab.run.prompts import caption_inputs

    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(64, 48), (28, 28), (96, 64)]]
    inputs = caption_inputs(load_processor(folder), images, "describe this image")
    if padded:  # images of different sizes: a left-padded batch (Qwen2-VL's image tokens grow with the image)
        assert not inputs["attention_mask"].bool().all()
    return inputs


def test_decode_steps_get_a_ready_mask_that_changes_nothing(tiny_vlms, monkeypatch):
    """On a static cache, decode steps get their 4D mask made on the device (transformers' own mask
    building waits for the GPU every step); the tokens are generate's."""
    import torch
    from transformers import AutoModelForImageTextToText

    from vlmlab.run.fast_generate import FastGenerator

    model = AutoModelForImageTextToText.from_pretrained(tiny_vlms["qwen2_vl"], dtype=torch.float32).eval()
    inputs = _batch(tiny_vlms["qwen2_vl"])
    made = []
    real = decode_loop._cache_slots
    monkeypatch.setattr(decode_loop, "_cache_slots", lambda m, kw: made.append(real(m, kw)) or made[-1])
    kw = dict(max_new_tokens=2 * decode_loop.CHECK_EVERY, do_sample=False)
    with torch.inference_mode():
        plain = model.generate(**inputs, **kw)
        fast = FastGenerator(model, prefill="eager").generate(dict(inputs), **kw)
    assert made and made[-1] is not None
    allowed, positions = made[-1]
    assert allowed.shape == (3, positions.numel()) and not allowed[:, :inputs["input_ids"].shape[1]].all()
    n = min(plain.shape[1], fast.shape[1])
    assert torch.equal(plain[:, :n], fast[:, :n])
    assert not hasattr(model, "create_masks_for_generate") or "create_masks_for_generate" not in vars(model)


def test_a_model_whose_states_do_not_fit_a_static_cache_falls_back_to_generates_own(tiny_vlms):
    import torch
    from transformers import AutoModelForImageTextToText

    from vlmlab.run.fast_generate import FastGenerator

    model = AutoModelForImageTextToText.from_pretrained(tiny_vlms["mllama"], dtype=torch.float32).eval()
    inputs = _batch(tiny_vlms["mllama"], padded=False)
    gen = FastGenerator(model, prefill="eager")
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    with torch.inference_mode():
        out = gen.generate(dict(inputs), **kw)
        assert torch.equal(out, model.generate(**inputs, **kw))
    assert gen.static_cache is False and "the static cache failed" in gen.fallbacks[-1]


def test_per_token_inputs_are_cut_to_the_step_as_newer_transformers_cut_them():
    """transformers 5.17 hands mm_token_type_ids to a decode step whole (5.24 cuts it to the step's
    tokens): it would grow a column a step, and a CUDA graph has fixed shapes."""
    import torch

    step = {"input_ids": torch.ones(2, 1, dtype=torch.long),
            "mm_token_type_ids": torch.tensor([[0, 1, 1, 0, 0], [1, 1, 0, 0, 0]]),
            "token_type_ids": torch.zeros(2, 1, dtype=torch.long), "image_grid_thw": torch.ones(2, 3)}
    out = decode_loop._per_step(dict(step))
    assert out["mm_token_type_ids"].tolist() == [[0], [0]]
    assert out["token_type_ids"] is step["token_type_ids"] and out["image_grid_thw"] is step["image_grid_thw"]
    embeds = {"inputs_embeds": torch.ones(2, 1, 4), "mm_token_type_ids": torch.zeros(2, 5)}
    assert decode_loop._per_step(dict(embeds))["mm_token_type_ids"].shape == (2, 5)  # no input_ids: left alone
