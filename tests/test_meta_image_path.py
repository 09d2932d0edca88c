"""Image tokens where the family's processor cannot count them as is (issue 10, config zoo).

Each generic rule is checked on transformers' default configs shrunk to 2 layers (meta device):
the model's own image path run on meta (``get_image_features`` with the grid / sizes its signature
asks for, or a vision encoder's output for encoder-decoder and prefix models) must count what the
processor counts where both can; a processor registered under the type's own package (omni
"thinkers"), a tokenizer that lacks a token the processor looks up by text (Fuyu), a video-processor
setting read at construction (MiniCPM-V 4.6), special tokens a processor reads as None (Gemma 4),
an image-processor step that needs an optional library (UDOP's OCR) and a processor that places
the image tokens itself are handled; a text-only config is refused with a specific message.
"""
from types import SimpleNamespace

import pytest

from tests import config_zoo
from vlmlab.model import image_tokens, local_processor, meta_image_path

SIZES = [(1024, 768), (448, 448)]


@pytest.fixture(scope="module")
def meta():
    from vlmlab.model.catalog import build_meta_model

    cache = {}

    def get(model_type):
        if model_type not in cache:
            config = config_zoo.build_config(model_type)
            cache[model_type] = config, build_meta_model(config, include_buffers=True)
        return cache[model_type]

    return get


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_omni_thinker"])
def test_meta_path_with_a_grid_counts_what_the_processor_counts(meta, model_type, monkeypatch):
    config, model = meta(model_type)
    for size in SIZES:
        by_processor = image_tokens.count(config, size)
        assert by_processor.source.startswith("processor"), by_processor.source
        assert by_processor.prompt_ids.count(by_processor.token_id) == by_processor.per_image
        n, patches, _, how = meta_image_path.count(model, config, size)
        assert "image processor" in how and (n, patches) == (by_processor.per_image, by_processor.vision_tokens)
    # no image processor at all: the grid is made from the vision config's patch and merge sizes
    monkeypatch.setattr(meta_image_path, "image_processor_for", _unavailable)
    for size in SIZES:
        n, _, run, how = meta_image_path.count(model, config, size)
        assert "vision config" in how and n == image_tokens.count(config, size).per_image, size


@pytest.mark.parametrize("model_type, patch, merge", [
    ("kimi_k25", 14, 2),  # merge_kernel_size [2, 2]; patches as (C, p, p) tiles, not rows
    ("mistral3", 14, 2),  # its code moves image_sizes to the model's device, then reads them: kept on the CPU
    ("lfm2_vl", 16, 2),  # NaFlex rows with a pixel_attention_mask, selected by a boolean mask (meta nonzero)
    ("minicpm_ocr", 16, 2),  # target_sizes in patches; get_image_features of the inner model (*args wrapper)
])
def test_meta_path_from_the_config_for_dynamic_towers(meta, model_type, patch, merge, monkeypatch):
    """Without its image processor (torchvision-only here), the model's own path counts one feature per
    merged window of the image's patches, the image rounded to whole windows."""
    config, model = meta(model_type)
    monkeypatch.setattr(meta_image_path, "image_processor_for", _unavailable)
    n, _, run, how = meta_image_path.count(model, config, (1024, 768))
    windows = [round(side / (patch * merge)) for side in (1024, 768)]
    assert "vision config" in how and n == windows[0] * windows[1], (n, run, how)


def _unavailable(config):
    raise local_processor.ProcessorUnavailable("no image processor in this test")


def test_omni_thinker_finds_the_processor_of_its_package():
    proc_names, image_names = local_processor._registered("qwen2_5_omni_thinker")
    assert "Qwen2_5OmniProcessor" in proc_names and image_names
    assert local_processor._registered("mystery_vlm") == ([], [])


@pytest.mark.parametrize("model_type, tokens", [("blip", (384 // 16) ** 2 + 1), ("git", (224 // 16) ** 2 + 1),
                                                ("vision-encoder-decoder", (224 // 16) ** 2 + 1)])
def test_encoder_output_is_what_the_text_side_attends_to(model_type, tokens):
    """No image token in the prompt: the text model attends to the vision encoder's output."""
    from vlmlab.model.spec import build

    config = config_zoo.build_config(model_type)
    spec = build(model_type, config, "config")
    assert spec.dims.image_tokens == tokens, spec.image_tokens_source
    assert spec.image_tokens_source.startswith(image_tokens.META_PATH) and "vision module" in spec.image_tokens_source


def test_meta_path_failure_is_a_specific_refusal(meta, monkeypatch):
    _, model = meta("qwen2_vl")
    monkeypatch.setattr(meta_image_path, "image_processor_for", _unavailable)
    bare = SimpleNamespace(model_type="bare_vlm", vision_config=SimpleNamespace())  # nothing to make inputs from
    with pytest.raises(image_tokens.ImageTokensUnknown, match="why not; and its image path takes.*no patch size"):
        image_tokens._meta_path(model, bare, (640, 480), "why not")


def test_processor_repairs():
    fuyu = config_zoo.build_config("fuyu")  # FuyuProcessor reads vocab['|SPEAKER|'] in its constructor
    processor = local_processor._local_processor(fuyu)
    assert processor.image_token == "|SPEAKER|" and "|SPEAKER|" in processor.tokenizer.get_vocab()
    udop = local_processor.image_processor_for(config_zoo.build_config("udop"))  # OCR needs pytesseract
    assert udop.apply_ocr is False
    for model_type in ("minicpmv4_6", "gemma4"):  # video processor settings; boa/eoa tokens read as None
        counted = image_tokens.count(config_zoo.build_config(model_type), (1024, 768))
        assert counted.source == "processor (built from defaults)", model_type
        assert counted.prompt_ids.count(counted.token_id) == counted.per_image > 0


def test_a_processor_that_places_the_image_tokens_itself(monkeypatch):
    import torch

    class SelfPlacing:  # Florence-2 style: the prompt must not hold the placeholder
        image_token = "<image>"

        def __call__(self, text, images=None, return_tensors=None):
            if images and any(self.image_token in t for t in text):
                raise ValueError("Found total 2 <image> tokens and 1 images")
            return {"input_ids": torch.tensor([([7] * 5 if images else []) + [1, 2]])}

    monkeypatch.setattr(image_tokens, "build_processor", lambda config, folder: (SelfPlacing(), "processor (stub)"))
    counted = image_tokens.count(SimpleNamespace(model_type="stub", image_token_id=7), (64, 48))
    assert (counted.per_image, counted.sequence_tokens) == (5, 5)


def test_text_only_config_is_refused_specifically():
    import vlmlab
    from transformers import AutoConfig
    from vlmlab.model.introspect import RolesUnknown

    with pytest.raises(RolesUnknown, match="no vision config.*text-only"):
        vlmlab.spec(config_zoo.build_config("mistral4"))
    gemma4 = AutoConfig.for_model("gemma4")  # its default leaves vision_config None; the zoo fills it
    assert gemma4.vision_config is None and config_zoo.build_config("gemma4").vision_config is not None


def test_a_placeholder_written_once_next_to_a_patch_run_gives_the_patch_token_the_image_id():
    """Llama 4: ``<|image|>`` once, ``<|patch|>`` once per feature, and the model's image id is the
    patch token's; Mllama's single ``<|image|>`` (cross-attention) stays one token."""
    from vlmlab.model.local_processor import _tokenizer

    tokens = {"<|image|>": 9000, "<|patch|>": None, "<|image_end|>": None}
    processor = SimpleNamespace(tokenizer=_tokenizer(tokens, SimpleNamespace(vocab_size=10000)))
    patch, end = (processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|patch|>", "<|image_end|>"))
    llama4_ids = [1, 9000] + [patch] * image_tokens.PATCH_RUN + [end, 2]
    assert image_tokens._repeated_token_fix(processor, tokens, 9000, llama4_ids, 1) == \
        {"<|patch|>": 9000, "<|image|>": -1}
    assert image_tokens._repeated_token_fix(processor, tokens, 9000, [1, 9000, end, 2], 1) == {}


def test_the_image_path_beats_a_stale_config_count_and_an_encoder_does_not():
    """PP-Chart2Table's config says image_seq_length 576, its image path makes 256 features (GOT-OCR 2's
    processor writes 256); InstructBLIP-Video has no get_image_features, and its Q-Former's 32 query
    tokens (the config's count), not the vision encoder's 257 outputs, are what its text model sees."""
    from vlmlab.model.spec import build

    chart = build("pp_chart2table", config_zoo.build_config("pp_chart2table"), "config")
    assert chart.dims.image_tokens == 256 and chart.image_tokens_source.startswith(image_tokens.META_PATH)
    assert image_tokens.count(config_zoo.build_config("got_ocr2"), (1024, 768)).per_image == 256
    video = build("instructblipvideo", config_zoo.build_config("instructblipvideo"), "config")
    assert video.dims.image_tokens == 32 and video.image_tokens_source.startswith("config")
