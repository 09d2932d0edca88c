"""Every family captions end to end through vlmlab's own path (plan, load, processor, prompt,
generate), on tiny models built offline by tests/tiny_vlms.py.

For each family: a batch of 4 images of different sizes comes back captioned, and in float32
with greedy decoding the batched tokens equal each image captioned alone, token for token. That
is the test that catches left-padding, image-size-list, nested-image-list and per-image-grid bugs
(the dynamic-resolution families get prompts of different lengths, so padding is exercised).
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import vlmlab
from tests.tiny_vlms import FAMILIES
from vlmlab.run import batch as captioning
from vlmlab.model.saved_processor import load_processor
from vlmlab.run.prompts import DEFAULT_PROMPTS, FALLBACK_PROMPT, build_prompt, caption_inputs, chat_template_of

SIZES = [(40, 30), (64, 64), (23, 57), (90, 48)]  # (width, height)
MAX_NEW_TOKENS = 8
PROMPT = "Describe this image in one sentence."
#: families whose processors give different images prompts of different lengths here
DYNAMIC = {"llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "internvl"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]


def _tokens(lm, images, prompt):
    return [row["tokens"] for row in captioning.caption_batch(lm, images, prompt, MAX_NEW_TOKENS)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_captions_a_batch_like_one_at_a_time(family, tiny_vlms, images):
    vlmlab.unload()
    try:  # the family's default prompt: an instruction in its chat template, "caption en" (PaliGemma), none (BLIP-2)
        result = vlmlab.caption(images, model=str(tiny_vlms[family]), batch_size=4, max_new_tokens=MAX_NEW_TOKENS,
                                dtype="float32", progress=False)
        rows = result.rows
        assert result.prompt == DEFAULT_PROMPTS.get(family.replace("blip2", "blip-2"), FALLBACK_PROMPT)
        assert [r["error"] for r in rows] == [None] * 4, rows
        assert all(r["batch_size"] == 4 and isinstance(r["caption"], str) for r in rows), rows
        assert any(r["n_tokens"] for r in rows), rows  # a random model may stop at once on one image, not on all
        (lm,) = vlmlab.loaded()  # caption() loaded the folder once, the way it loads a Hub model

        inputs = caption_inputs(lm.processor, images, result.prompt)
        lengths = inputs["attention_mask"].sum(1).tolist()
        assert (len(set(lengths)) > 1) == (family in DYNAMIC), lengths

        batched = _tokens(lm, images, result.prompt)
        alone = [_tokens(lm, [im], result.prompt)[0] for im in images]
        assert batched == alone
        assert len({tuple(t) for t in alone}) > 1, "every image got the same caption: the image is ignored"
        pad = lm.model.generation_config.pad_token_id
        assert [r["n_tokens"] for r in rows] == [sum(t != pad for t in ids) for ids in alone]
        decode = lm.processor.tokenizer.decode
        assert [r["caption"] for r in rows] == [decode(t, skip_special_tokens=True).strip() for t in alone]
    finally:
        vlmlab.unload()


def test_blip2_prompt_uses_the_tokenizer_template_the_processor_dropped(tiny_vlms, tmp_path):
    """Blip2Processor keeps no chat template at load; its tokenizer does, and the prompt path uses it."""
    from tests.tiny_vlms import chat_template

    processor = load_processor(tiny_vlms["blip2"])
    processor.tokenizer.chat_template = chat_template("Question: ", "", " ", "Answer:")
    processor.save_pretrained(tmp_path)
    reloaded = load_processor(tmp_path)
    assert reloaded.chat_template is None and reloaded.tokenizer.chat_template
    assert chat_template_of(reloaded) == reloaded.tokenizer.chat_template
    assert build_prompt(reloaded, "what is it?") == "Question: what is it? Answer:"


@pytest.mark.parametrize("family", ["gemma3", "mllama"])
def test_templates_that_write_bos_get_one_bos(family, tiny_vlms, images):
    processor = load_processor(tiny_vlms[family])
    bos = processor.tokenizer.bos_token_id
    ids = caption_inputs(processor, images[:1], PROMPT)["input_ids"][0].tolist()
    assert ids[0] == bos and ids.count(bos) == 1


@pytest.mark.parametrize("family", ["qwen2_vl", "internvl", "smolvlm"])
def test_processors_with_a_video_part_load_without_torchvision(family, tiny_vlms):
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: the real video processor loads")
    processor = load_processor(tiny_vlms[family])
    assert type(processor).__name__ == {"qwen2_vl": "Qwen2VLProcessor", "internvl": "InternVLProcessor",
                                        "smolvlm": "SmolVLMProcessor"}[family]
    with pytest.raises(ImportError, match="torchvision"):
        processor.video_processor([np.zeros((2, 32, 32, 3), dtype=np.uint8)])


def test_dataset_and_mixed_sizes(tiny_vlms, images):
    """A Hugging Face datasets.Dataset with an image column, and PIL images of different sizes in one batch."""
    import datasets  # in the dev extra: a missing install fails here rather than skipping
    ds = datasets.Dataset.from_dict({"image": images, "id": list(range(len(images)))},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "id": datasets.Value("int32")}))
    folder = str(tiny_vlms["qwen2_vl"])
    vlmlab.unload()
    try:
        from_dataset = vlmlab.caption(ds, model=folder, prompt=PROMPT, batch_size=4, max_new_tokens=MAX_NEW_TOKENS,
                                      dtype="float32", progress=False)
        from_pil = vlmlab.caption(images, model=folder, prompt=PROMPT, batch_size=4, max_new_tokens=MAX_NEW_TOKENS,
                                  dtype="float32", progress=False)
        assert [r["image"] for r in from_dataset.rows] == [f"dataset:{i}" for i in range(4)]
        assert [r["error"] for r in from_dataset.rows] == [None] * 4
        assert list(from_dataset.captions.values()) == list(from_pil.captions.values())
    finally:
        vlmlab.unload()
