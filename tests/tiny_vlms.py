"""Tiny VLM folders of every family vlmlab captions with, built offline in seconds.

Each folder holds what a Hub checkpoint holds, at toy size: the family's real config class, its
real processor class (image processor from its defaults at a small image size, a byte-level BPE
tokenizer trained here with the family's special tokens, the family's chat-template format) and
random weights, all written with ``save_pretrained``. Weights are re-drawn larger than
transformers' default init and zero-initialised gates are opened, so different images give
different captions: with default init every image gets the same caption and a batching bug hides.

    from tests.tiny_vlms import build, build_all, FAMILIES
    folder = build("qwen2_vl", tmp_path / "qwen2_vl")

Processors that need a video processor (Qwen2-VL, Qwen2.5-VL, InternVL, SmolVLM) are built with a
stand-in (transformers' ``BaseVideoProcessor``, which needs no torchvision) and the saved config
names the family's real video-processor class, as on the Hub, so loading meets the same
torchvision requirement a Hub checkpoint does.

The chat templates are written here in each family's published prompt format (roles, image
placeholder, generation prompt, whether the template writes BOS); they are not byte copies.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

SEED = 0
# a long context although prompts are short: caption() refuses a prompt whose image tokens at a
# photo-sized default image (1024x768) would not fit, and Qwen2-VL counts 3072 there
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
CORPUS_WORDS = ("a an the red green blue yellow white black orange purple circle square triangle star "
                "small large big on in of above below left right next to and with image photo picture "
                "describe this one sentence caption en question answer user assistant system model you "
                "are helpful shape shapes background two three").split()


# ------------------------------------------------------------------------------ chat templates
def chat_template(user_start: str, image: str, user_end: str, assistant_start: str, assistant_end: str = "",
                  system: str = "", bos: bool = False) -> str:
    """A chat template in one family's format: ``system`` once, each user turn as
    ``user_start + parts + user_end`` (an image part renders as ``image``), each assistant turn as
    ``assistant_start + text + assistant_end``, then ``assistant_start`` as the generation prompt."""
    parts = ("{% if message['content'] is string %}{{ message['content'] }}{% else %}"
             "{% for part in message['content'] %}{% if part['type'] == 'image' %}" + image +
             "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}")
    return (("{{ bos_token }}" if bos else "") + system +
            "{% for message in messages %}{% if message['role'] == 'user' %}" + user_start + parts + user_end +
            "{% elif message['role'] == 'assistant' %}" + assistant_start + parts + assistant_end +
            "{% endif %}{% endfor %}{% if add_generation_prompt %}" + assistant_start + "{% endif %}")


_QWEN_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
TEMPLATES = {
    "llava": chat_template("USER: ", "<image>\n", " ", "ASSISTANT:", "</s>"),
    "llava_next": chat_template("[INST] ", "<image>\n", " [/INST]", "", "</s>"),
    "qwen2_vl": chat_template("<|im_start|>user\n", "<|vision_start|><|image_pad|><|vision_end|>", "<|im_end|>\n",
                              "<|im_start|>assistant\n", "<|im_end|>\n", system=_QWEN_SYSTEM),
    "idefics3": chat_template("<|im_start|>User:", "<image>", "<end_of_utterance>\n", "Assistant:",
                              "<end_of_utterance>\n"),
    "idefics2": chat_template("User:", "<image>", "<end_of_utterance>\n", "Assistant:", "<end_of_utterance>\n"),
    "internvl": chat_template("<|im_start|>user\n", "<IMG_CONTEXT>\n", "<|im_end|>\n", "<|im_start|>assistant\n",
                              "<|im_end|>\n"),
    "gemma3": chat_template("<start_of_turn>user\n", "<start_of_image>", "<end_of_turn>\n",
                            "<start_of_turn>model\n", "<end_of_turn>\n", bos=True),
    "mllama": chat_template("<|start_header_id|>user<|end_header_id|>\n\n", "<|image|>", "<|eot_id|>",
                            "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>", bos=True),
}


# -------------------------------------------------------------------------------- tokenizers
def tokenizer(bos: str | None, eos: str, pad: str, specials=(), named: dict | None = None, add_bos: bool = False,
              unk: str | None = None, vocab_size: int = 360):
    """A byte-level BPE tokenizer trained on a small caption corpus, with the family's special
    tokens; ``named`` become tokenizer attributes (``tokenizer.image_token`` ...); ``add_bos``
    writes BOS before every text, as Llama/Gemma tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    named = dict(named or {})
    base = [t for t in dict.fromkeys([pad, bos, eos, unk]) if t]
    extra = [t for t in dict.fromkeys([*specials, *named.values()]) if t not in base]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=base + extra, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = [" ".join(CORPUS_WORDS[i::k]) for k in (1, 2, 3, 5, 7) for i in range(k)]
    tok.train_from_iterator(lines * 4, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk,
                                   extra_special_tokens=named, model_max_length=512)


# ------------------------------------------------------------------------------- the families
def _image_processor(name: str, **kwargs):
    """The family's image processor class without torchvision (its PIL backend) at our sizes."""
    import transformers

    cls = getattr(transformers, name + "Pil", None) or getattr(transformers, name)
    return cls(**kwargs)


def _without_video(processor_cls):
    """``processor_cls`` accepting a video-processor stand-in: transformers checks the argument's
    class through the video-processor registry, which is a torchvision-only placeholder here."""
    def check_argument_for_proper_class(self, argument_name, argument):
        if "video" in argument_name:
            return type(argument)
        return processor_cls.check_argument_for_proper_class(self, argument_name, argument)

    methods = {"check_argument_for_proper_class": check_argument_for_proper_class,
               "__module__": processor_cls.__module__}
    return type(processor_cls.__name__, (processor_cls,), methods)


def _video_stand_in():
    from transformers.video_processing_utils import BaseVideoProcessor

    return BaseVideoProcessor()


def _text(**over) -> dict:
    return {**TEXT, **over}


def _clip(**over):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**{**VISION, "image_size": 32, "patch_size": 8, "projection_dim": 32, **over})


def _siglip(**over):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(**{**VISION, "image_size": 32, "patch_size": 8, **over})


def _llava():
    from transformers import LlamaConfig, LlavaConfig, LlavaProcessor

    tok = tokenizer("<s>", "</s>", "<pad>", named={"image_token": "<image>"}, unk="<unk>", add_bos=True)
    ip = _image_processor("CLIPImageProcessor", size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(ip, tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=TEMPLATES["llava"])

    def config(ids):
        return LlavaConfig(vision_config=_clip(), text_config=LlamaConfig(**_text(**ids)),
                           image_token_id=tok.image_token_id, vision_feature_layer=-2, image_seq_length=16)
    return proc, config


def _llava_next():
    from transformers import LlamaConfig, LlavaNextConfig, LlavaNextProcessor

    pinpoints = [[32, 64], [64, 32], [64, 64]]
    tok = tokenizer("<s>", "</s>", "<pad>", named={"image_token": "<image>"}, unk="<unk>", add_bos=True)
    ip = _image_processor("LlavaNextImageProcessor", size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                          image_grid_pinpoints=pinpoints)
    proc = LlavaNextProcessor(ip, tok, patch_size=8, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1, chat_template=TEMPLATES["llava_next"])

    def config(ids):
        return LlavaNextConfig(vision_config=_clip(), text_config=LlamaConfig(**_text(**ids)),
                               image_token_id=tok.image_token_id, image_grid_pinpoints=pinpoints,
                               vision_feature_layer=-2)
    return proc, config


def _qwen(version):
    import transformers

    named = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "vision_start_token": "<|vision_start|>",
             "vision_end_token": "<|vision_end|>"}
    tok = tokenizer(None, "<|im_end|>", "<|endoftext|>", specials=["<|im_start|>"], named=named)
    ip = _image_processor("Qwen2VLImageProcessor", patch_size=8, merge_size=2, temporal_patch_size=2,
                          size={"shortest_edge": 16 * 16 * 4, "longest_edge": 16 * 16 * 16})
    proc_cls = getattr(transformers, {"2": "Qwen2VLProcessor", "2.5": "Qwen2_5_VLProcessor"}[version])
    proc = _without_video(proc_cls)(ip, tok, _video_stand_in(), chat_template=TEMPLATES["qwen2_vl"])
    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}

    def config(ids):
        if version == "2":
            vision = dict(depth=2, embed_dim=32, hidden_size=TEXT["hidden_size"], num_heads=2, patch_size=8,
                          spatial_merge_size=2, temporal_patch_size=2)
            cls = transformers.Qwen2VLConfig
        else:
            vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8,
                          spatial_merge_size=2, temporal_patch_size=2, window_size=32, fullatt_block_indexes=[1],
                          out_hidden_size=TEXT["hidden_size"])
            cls = transformers.Qwen2_5_VLConfig
        return cls(text_config=_text(**ids, rope_parameters=rope), vision_config=vision,
                   image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
                   vision_start_token_id=tok.vision_start_token_id, vision_end_token_id=tok.vision_end_token_id)
    return proc, config


def _idefics3(smol):
    import transformers
    from transformers import LlamaConfig

    grid = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    specials = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", "<|im_start|>", *grid]
    tok = tokenizer("<|im_start|>", "<end_of_utterance>", "<pad>", specials=specials, named={"image_token": "<image>"})
    name = "SmolVLM" if smol else "Idefics3"
    ip = _image_processor(f"{name}ImageProcessor", size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    if smol:
        proc = _without_video(transformers.SmolVLMProcessor)(ip, tok, _video_stand_in(), image_seq_len=4,
                                                             chat_template=TEMPLATES["idefics3"])
    else:
        proc = transformers.Idefics3Processor(ip, tok, image_seq_len=4, chat_template=TEMPLATES["idefics3"])

    def config(ids):
        vision = getattr(transformers, f"{name}VisionConfig")(**VISION, image_size=32, patch_size=8)
        return getattr(transformers, f"{name}Config")(vision_config=vision, text_config=LlamaConfig(**_text(**ids)),
                                                      image_token_id=tok.image_token_id, scale_factor=2)
    return proc, config


def _idefics2():
    from transformers import Idefics2Config, Idefics2Processor, MistralConfig

    tok = tokenizer("<s>", "</s>", "<unk>", specials=["<end_of_utterance>"], add_bos=True,
                    named={"image_token": "<image>", "image_boundary_token": "<fake_token_around_image>"})
    ip = _image_processor("Idefics2ImageProcessor", size={"shortest_edge": 24, "longest_edge": 48},
                          do_image_splitting=False)
    proc = Idefics2Processor(ip, tok, image_seq_len=4, chat_template=TEMPLATES["idefics2"])

    def config(ids):
        return Idefics2Config(vision_config={**VISION, "image_size": 48, "patch_size": 8},
                              perceiver_config=dict(hidden_size=TEXT["hidden_size"], resampler_n_latents=4,
                                                    resampler_depth=1, resampler_n_heads=2, resampler_head_dim=16,
                                                    num_key_value_heads=1),
                              text_config=MistralConfig(**_text(**ids)), image_token_id=tok.image_token_id)
    return proc, config


def _paligemma():
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaProcessor

    tok = tokenizer("<bos>", "<eos>", "<pad>", named={"image_token": "<image>"}, unk="<unk>", add_bos=True)
    ip = _image_processor("SiglipImageProcessor", size={"height": 32, "width": 32})
    ip.image_seq_length = 16
    proc = PaliGemmaProcessor(ip, tok)  # PaliGemma ships no chat template: the processor builds the prompt

    def config(ids):
        return PaliGemmaConfig(vision_config=_siglip(projection_dim=TEXT["hidden_size"]),
                               text_config=GemmaConfig(**_text(**ids, head_dim=16)),
                               image_token_id=tok.image_token_id, projection_dim=TEXT["hidden_size"],
                               hidden_size=TEXT["hidden_size"])
    return proc, config


def _blip2():
    from transformers import Blip2Config, Blip2Processor, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

    tok = tokenizer("</s>", "</s>", "<pad>", unk="<unk>", add_bos=True)
    ip = _image_processor("BlipImageProcessor", size={"height": 32, "width": 32})
    proc = Blip2Processor(ip, tok, num_query_tokens=4)  # adds "<image>"; BLIP-2 (OPT) ships no chat template

    def config(ids):
        text = OPTConfig(hidden_size=TEXT["hidden_size"], ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                         word_embed_proj_dim=TEXT["hidden_size"], max_position_embeddings=512, **ids)
        return Blip2Config(vision_config=Blip2VisionConfig(**VISION, image_size=32, patch_size=8),
                           qformer_config=Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                             intermediate_size=64, encoder_hidden_size=32),
                           text_config=text, num_query_tokens=4,
                           image_token_index=tok.convert_tokens_to_ids("<image>"))
    return proc, config


def _internvl():
    from transformers import InternVLConfig, InternVLProcessor, InternVLVisionConfig, Qwen2Config

    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    tok = tokenizer(None, "<|im_end|>", "<|endoftext|>", specials=["<|im_start|>"], named=named)
    ip = _image_processor("GotOcr2ImageProcessor", size={"height": 32, "width": 32}, crop_to_patches=True,
                          min_patches=1, max_patches=4)
    proc = _without_video(InternVLProcessor)(ip, tok, _video_stand_in(), image_seq_length=4,
                                             chat_template=TEMPLATES["internvl"])

    def config(ids):
        vision = InternVLVisionConfig(**VISION, image_size=[32, 32], patch_size=[8, 8])
        return InternVLConfig(vision_config=vision, text_config=Qwen2Config(**_text(**ids)),
                              image_token_id=tok.context_image_token_id, image_seq_length=4, downsample_ratio=0.5)
    return proc, config


def _gemma3():
    from transformers import Gemma3Config, Gemma3Processor, Gemma3TextConfig

    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tok = tokenizer("<bos>", "<eos>", "<pad>", specials=["<start_of_turn>", "<end_of_turn>"], named=named,
                    unk="<unk>", add_bos=True)
    ip = _image_processor("Gemma3ImageProcessor", size={"height": 32, "width": 32})
    proc = Gemma3Processor(ip, tok, chat_template=TEMPLATES["gemma3"], image_seq_length=4)

    def config(ids):
        # untied: in a random 2-layer Gemma 3 the tied head reads back the last token (sandwich norms
        # keep every layer's output small next to the scaled embedding) and every image gets "\n\n\n..."
        text = Gemma3TextConfig(**_text(**ids, head_dim=16, query_pre_attn_scalar=16, sliding_window=64),
                                tie_word_embeddings=False)
        return Gemma3Config(text_config=text, vision_config=_siglip(), mm_tokens_per_image=4, tie_word_embeddings=False,
                            boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id,
                            image_token_index=tok.image_token_id)
    return proc, config


def _mllama():
    from transformers import MllamaConfig, MllamaProcessor, MllamaTextConfig, MllamaVisionConfig

    specials = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>"]
    tok = tokenizer("<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>", specials=specials,
                    named={"image_token": "<|image|>"}, add_bos=True)
    ip = _image_processor("MllamaImageProcessor", size={"height": 32, "width": 32}, max_image_tiles=4)
    proc = MllamaProcessor(ip, tok, chat_template=TEMPLATES["mllama"])

    def config(ids):
        vision = MllamaVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                                    attention_heads=2, image_size=32, patch_size=8, max_num_tiles=4,
                                    intermediate_layers_indices=[0], vision_output_dim=64)
        text = MllamaTextConfig(**{**_text(**ids), "num_hidden_layers": 3}, cross_attention_layers=[1])
        return MllamaConfig(vision_config=vision, text_config=text, image_token_index=tok.image_token_id)
    return proc, config


#: family -> builder: () -> (processor, config(token_ids) -> model config[, real video-processor class])
FAMILIES = {
    "llava": _llava,
    "llava_next": _llava_next,
    "qwen2_vl": lambda: _qwen("2"),
    "qwen2_5_vl": lambda: _qwen("2.5"),
    "idefics3": lambda: _idefics3(smol=False),
    "smolvlm": lambda: _idefics3(smol=True),
    "paligemma": _paligemma,
    "blip2": _blip2,
    "internvl": _internvl,
    "gemma3": _gemma3,
    "idefics2": _idefics2,
    "mllama": _mllama,
}


# -------------------------------------------------------------------------------- the weights
def redraw_weights(model, seed: int = SEED, gain: float = 2.0) -> None:
    """Re-draw every matrix as N(0, gain/sqrt(fan_in)) and open every zero gate (tanh gates of
    Mllama's cross-attention and tile embeddings), so the image reaches the text."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=gen) * (gain / math.sqrt(fan_in)))
            elif "gate" in name.rsplit(".", 1)[-1] and not p.any():
                p.fill_(1.0)


def _token_ids(tok) -> dict:
    return {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
            "bos_token_id": tok.bos_token_id}


def build(family: str, folder, seed: int = SEED) -> Path:
    """Build the tiny ``family`` model into ``folder`` (created); returns the folder."""
    import torch
    from transformers import AutoModelForImageTextToText

    if family not in FAMILIES:
        raise ValueError(f"no tiny builder for {family!r}; known: {', '.join(FAMILIES)}")
    folder = Path(folder)
    proc, make_config = FAMILIES[family]()
    tok = proc.tokenizer  # after the processor: some processors add their tokens to it
    config = make_config(_token_ids(tok))
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    redraw_weights(model, seed)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    if tok.bos_token_id is not None:
        model.generation_config.bos_token_id = tok.bos_token_id
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    _name_real_video_processor(folder, config.model_type)
    return folder


def _name_real_video_processor(folder: Path, model_type: str) -> None:
    """Write the family's real video-processor class (from transformers' auto mapping) where the
    stand-in was saved, so the folder reads like a Hub checkpoint's."""
    from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING_NAMES

    names = VIDEO_PROCESSOR_MAPPING_NAMES.get(model_type)
    if not names:
        return
    class_name = (names.get("torchvision") or next(iter(names.values()))) if isinstance(names, dict) else names
    for path in folder.glob("*.json"):
        text = path.read_text()
        if "BaseVideoProcessor" in text:
            path.write_text(text.replace('"BaseVideoProcessor"', json.dumps(class_name)))


def build_all(root, families=None) -> dict[str, Path]:
    """Build every family (or ``families``) under ``root``; returns {family: folder}. A folder
    that already holds a model is reused."""
    root = Path(root)
    out = {}
    for family in families or FAMILIES:
        folder = root / family
        if not (folder / "config.json").exists():
            build(family, folder)
        out[family] = folder
    return out
