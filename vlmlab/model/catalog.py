"""Built-in offline catalogue of well-known vision-language model configs.

Each entry holds the ``config.json`` contents of a published checkpoint as a
plain dict, so that vlmlab can build the model's module tree on the ``meta``
device without network access (no hub download, no weights).

The configs follow the published ``config.json`` files, written with the
transformers 5 field names (``text_config`` / ``vision_config`` nesting,
``rope_parameters``).  Fields that transformers would fill with the same value
by default are spelled out anyway, so an entry does not silently change when a
transformers release changes a default.  Only long-standing fields are used,
so every entry builds with transformers >= 5.17.

``published_params`` is the parameter count of the published checkpoint, with
``source`` saying where that number comes from (the Hub's safetensors metadata,
i.e. the "Model size" shown on the model page, or the ``total_size`` of
``model.safetensors.index.json`` divided by the bytes per parameter).

Nothing here imports torch or transformers at module level.

    >>> from vlmlab.model import catalog
    >>> cfg = catalog.build_config("qwen2.5-vl-7b")
    >>> model = catalog.build_meta_model(cfg)      # every parameter on 'meta'
"""

from __future__ import annotations

import copy
import difflib

__all__ = ["CATALOGUE", "names", "entry", "build_config", "build_meta_model"]


# ---------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------

def _clip_vit_l14_336() -> dict:
    """openai/clip-vit-large-patch14-336 vision tower (LLaVA 1.5 / 1.6)."""
    return {
        "model_type": "clip_vision_model",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_channels": 3,
        "image_size": 336,
        "patch_size": 14,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-05,
        "projection_dim": 768,
        "vocab_size": 32000,
    }


def _qwen2_vl_vision(out_hidden_size: int) -> dict:
    """Qwen2-VL ViT-675M (32 blocks, 1280 wide); ``hidden_size`` is the merger's output width."""
    return {
        "model_type": "qwen2_vl_vision",
        "depth": 32,
        "embed_dim": 1280,
        "hidden_size": out_hidden_size,
        "hidden_act": "quick_gelu",
        "mlp_ratio": 4,
        "num_heads": 16,
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }


def _qwen2_5_vl_vision(out_hidden_size: int, intermediate_size: int = 3420) -> dict:
    """Qwen2.5-VL windowed ViT (32 blocks, 1280 wide; SwiGLU 3420 for 3B/7B, 3456 for 32B/72B)."""
    return {
        "model_type": "qwen2_5_vl_vision",
        "depth": 32,
        "hidden_size": 1280,
        "hidden_act": "silu",
        "intermediate_size": intermediate_size,
        "num_heads": 16,
        "in_channels": 3,
        "out_hidden_size": out_hidden_size,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
    }


_QWEN_VL_TOKENS = {
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
}


def _qwen_text(model_type: str, *, vocab_size, hidden_size, intermediate_size, num_hidden_layers,
               num_attention_heads, num_key_value_heads, max_position_embeddings, max_window_layers,
               tie_word_embeddings) -> dict:
    return {
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-06,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": 32768,
        "max_window_layers": max_window_layers,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": "bfloat16",
    }


def _qwen_vl(model_type: str, hub_id: str, text: dict, vision: dict, published_params: int, source: str) -> dict:
    """A Qwen2-VL / Qwen2.5-VL catalogue entry: the two generations share everything but the
    architecture name, the text config's sizes and the vision tower."""
    arch = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}[model_type]
    return {
        "hub_id": hub_id,
        "config": {
            "architectures": [arch],
            "model_type": model_type,
            **_QWEN_VL_TOKENS,
            "tie_word_embeddings": text["tie_word_embeddings"],
            "torch_dtype": "bfloat16",
            "text_config": _qwen_text(f"{model_type}_text", **text),
            "vision_config": vision,
        },
        "published_params": published_params,
        "source": source,
    }


def _llava_1_5(text: dict) -> dict:
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "ignore_index": -100,
        "image_token_index": 32000,
        "image_seq_length": 576,
        "pad_token_id": 32001,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "text_config": text,
        "vision_config": _clip_vit_l14_336(),
    }


def _llama2_text(*, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, name) -> dict:
    return {
        "_name_or_path": name,
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 32064,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-05,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "attention_bias": False,
        "mlp_bias": False,
        "pad_token_id": 32001,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
    }


def _internvit_300m() -> dict:
    """InternViT-300M-448px-V2_5 (InternVL3-1B/2B/8B/9B/14B vision tower)."""
    return {
        "model_type": "internvl_vision",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_channels": 3,
        "image_size": [448, 448],
        "patch_size": [14, 14],
        "hidden_act": "gelu",
        "attention_bias": True,
        "use_qk_norm": False,
        "norm_type": "layer_norm",
        "layer_norm_eps": 1e-06,
        "layer_scale_init_value": 0.1,
        "use_absolute_position_embeddings": True,
        "use_mask_token": False,
        "use_mean_pooling": True,
        "hidden_dropout_prob": 0.0,
        "attention_dropout": 0.0,
        "projection_dropout": 0.0,
        "initializer_range": 0.02,
    }


# ---------------------------------------------------------------------------
# The catalogue
# ---------------------------------------------------------------------------

# name -> {"name": name, "hub_id": ..., "config": {config.json contents incl. model_type},
#          "published_params": int, "source": where the published count comes from}
CATALOGUE: dict[str, dict] = {}

# --- LLaVA 1.5 (CLIP ViT-L/14-336 + 2-layer GELU MLP + Vicuna v1.5) --------
CATALOGUE["llava-1.5-7b"] = {
    "hub_id": "llava-hf/llava-1.5-7b-hf",
    "config": _llava_1_5(_llama2_text(
        name="lmsys/vicuna-7b-v1.5", hidden_size=4096, intermediate_size=11008,
        num_hidden_layers=32, num_attention_heads=32)),
    "published_params": 7_063_427_072,
    "source": "Hub safetensors metadata of llava-hf/llava-1.5-7b-hf (model page: 'Model size 7.06B params')",
}
CATALOGUE["llava-1.5-13b"] = {
    "hub_id": "llava-hf/llava-1.5-13b-hf",
    "config": _llava_1_5(_llama2_text(
        name="lmsys/vicuna-13b-v1.5", hidden_size=5120, intermediate_size=13824,
        num_hidden_layers=40, num_attention_heads=40)),
    # Only the rounded figure is given here: the exact safetensors total was not at hand offline.
    "published_params": 13_400_000_000,
    "source": "Hub model page of llava-hf/llava-1.5-13b-hf, safetensors metadata: 'Model size 13.4B params' "
              "(rounded to 3 significant digits)",
}

# --- LLaVA-NeXT (1.6) Mistral-7B: AnyRes tiling, image_newline parameter ----
CATALOGUE["llava-v1.6-mistral-7b"] = {
    "hub_id": "llava-hf/llava-v1.6-mistral-7b-hf",
    "config": {
        "architectures": ["LlavaNextForConditionalGeneration"],
        "model_type": "llava_next",
        "ignore_index": -100,
        "image_token_index": 32000,
        "image_seq_length": 576,
        "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "use_image_newline_parameter": True,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "text_config": {
            "_name_or_path": "mistralai/Mistral-7B-Instruct-v0.2",
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            "vocab_size": 32064,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "hidden_act": "silu",
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-05,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
            "sliding_window": None,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        },
        "vision_config": _clip_vit_l14_336(),
    },
    "published_params": 7_566_747_648,
    "source": "Hub safetensors metadata of llava-hf/llava-v1.6-mistral-7b-hf (model page: 'Model size 7.57B params')",
}

# --- Qwen2-VL (ViT-675M + 2-layer MLP merger + Qwen2 LM with M-RoPE) -----------
CATALOGUE["qwen2-vl-2b"] = _qwen_vl(
    "qwen2_vl", "Qwen/Qwen2-VL-2B-Instruct",
    dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
         num_key_value_heads=2, max_position_embeddings=32768, max_window_layers=28, tie_word_embeddings=True),
    _qwen2_vl_vision(1536), 2_208_985_600,
    "Hub safetensors metadata of Qwen/Qwen2-VL-2B-Instruct (model page: 'Model size 2.21B params')")
CATALOGUE["qwen2-vl-7b"] = _qwen_vl(
    "qwen2_vl", "Qwen/Qwen2-VL-7B-Instruct",
    dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
         num_key_value_heads=4, max_position_embeddings=32768, max_window_layers=28, tie_word_embeddings=False),
    _qwen2_vl_vision(3584), 8_291_375_616,
    "Qwen/Qwen2-VL-7B-Instruct model.safetensors.index.json total_size 16582751232 bytes / 2 (bf16); "
    "model page: 'Model size 8.29B params'")

# --- Qwen2.5-VL (windowed SwiGLU ViT + MLP merger + Qwen2.5 LM with M-RoPE) -----
CATALOGUE["qwen2.5-vl-3b"] = _qwen_vl(
    "qwen2_5_vl", "Qwen/Qwen2.5-VL-3B-Instruct",
    dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
         num_key_value_heads=2, max_position_embeddings=128000, max_window_layers=70, tie_word_embeddings=True),
    _qwen2_5_vl_vision(2048), 3_754_622_976,
    "Hub safetensors metadata of Qwen/Qwen2.5-VL-3B-Instruct (model page: 'Model size 3.75B params')")
CATALOGUE["qwen2.5-vl-7b"] = _qwen_vl(
    "qwen2_5_vl", "Qwen/Qwen2.5-VL-7B-Instruct",
    dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
         num_key_value_heads=4, max_position_embeddings=128000, max_window_layers=28, tie_word_embeddings=False),
    _qwen2_5_vl_vision(3584), 8_292_166_656,
    "Hub safetensors metadata of Qwen/Qwen2.5-VL-7B-Instruct (model page: 'Model size 8.29B params')")
# NB: the 72B (like the 32B) vision tower has a 3456-wide SwiGLU MLP, the 3B/7B ones 3420.
CATALOGUE["qwen2.5-vl-72b"] = _qwen_vl(
    "qwen2_5_vl", "Qwen/Qwen2.5-VL-72B-Instruct",
    dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
         num_key_value_heads=8, max_position_embeddings=128000, max_window_layers=80, tie_word_embeddings=False),
    _qwen2_5_vl_vision(8192, intermediate_size=3456), 73_410_777_344,
    "Hub safetensors metadata of Qwen/Qwen2.5-VL-72B-Instruct (model page: 'Model size 73.4B params')")

# --- SmolVLM (Idefics3 architecture: SigLIP + pixel-shuffle connector + SmolLM2) -
CATALOGUE["smolvlm-256m"] = {
    "hub_id": "HuggingFaceTB/SmolVLM-256M-Instruct",
    "config": {
        "architectures": ["Idefics3ForConditionalGeneration"],
        "model_type": "idefics3",
        "image_token_id": 49190,
        "scale_factor": 4,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": "bfloat16",
        "text_config": {
            "model_type": "llama",
            "vocab_size": 49280,
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "head_dim": 64,
            "hidden_act": "silu",
            "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-05,
            "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
            "pad_token_id": 2,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        },
        "vision_config": {
            "model_type": "idefics3_vision",
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "num_channels": 3,
            "image_size": 512,
            "patch_size": 16,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-06,
        },
    },
    "published_params": 256_484_928,
    "source": "Hub safetensors metadata of HuggingFaceTB/SmolVLM-256M-Instruct (model page: 'Model size 256M params')",
}
CATALOGUE["smolvlm-2.2b"] = {
    "hub_id": "HuggingFaceTB/SmolVLM-Instruct",
    "config": {
        "architectures": ["Idefics3ForConditionalGeneration"],
        "model_type": "idefics3",
        "image_token_id": 49153,
        "scale_factor": 3,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": "bfloat16",
        "text_config": {
            "model_type": "llama",
            "vocab_size": 49155,
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_hidden_layers": 24,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "head_dim": 64,
            "hidden_act": "silu",
            "max_position_embeddings": 16384,
            "rms_norm_eps": 1e-05,
            "rope_parameters": {"rope_type": "default", "rope_theta": 273768.0},
            "pad_token_id": 2,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        },
        "vision_config": {
            "model_type": "idefics3_vision",
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_hidden_layers": 27,
            "num_attention_heads": 16,
            "num_channels": 3,
            "image_size": 384,
            "patch_size": 14,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-06,
        },
    },
    "published_params": 2_246_272_880,
    "source": "Hub safetensors metadata of HuggingFaceTB/SmolVLM-Instruct (model page: 'Model size 2.25B params')",
}

# --- PaliGemma (SigLIP So400m/14-224 + linear projector + Gemma-2B) -------------
CATALOGUE["paligemma-3b"] = {
    "hub_id": "google/paligemma-3b-pt-224",
    "config": {
        "architectures": ["PaliGemmaForConditionalGeneration"],
        "model_type": "paligemma",
        "ignore_index": -100,
        "image_token_index": 257152,
        "hidden_size": 2048,
        "projection_dim": 2048,
        "vocab_size": 257216,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "text_config": {
            "model_type": "gemma",
            "vocab_size": 257216,
            "hidden_size": 2048,
            "intermediate_size": 16384,
            "num_hidden_layers": 18,
            "num_attention_heads": 8,
            "num_key_value_heads": 1,
            "head_dim": 256,
            "hidden_activation": "gelu_pytorch_tanh",
            "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-06,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "num_image_tokens": 256,
            "bos_token_id": 2,
            "eos_token_id": 1,
            "pad_token_id": 0,
            "tie_word_embeddings": True,
            "torch_dtype": "float32",
        },
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_hidden_layers": 27,
            "num_attention_heads": 16,
            "num_channels": 3,
            "image_size": 224,
            "patch_size": 14,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-06,
            "num_image_tokens": 256,
            "projection_dim": 2048,
            "projector_hidden_act": "gelu_fast",
            "vision_use_head": False,
        },
    },
    "published_params": 2_923_466_480,
    "source": "Hub safetensors metadata of google/paligemma-3b-pt-224 (model page: 'Model size 2.92B params')",
}

# --- BLIP-2 (EVA ViT-g/14 + Q-Former with 32 queries + OPT-2.7B) -----------------
CATALOGUE["blip2-opt-2.7b"] = {
    "hub_id": "Salesforce/blip2-opt-2.7b",
    "config": {
        "architectures": ["Blip2ForConditionalGeneration"],
        "model_type": "blip-2",
        "num_query_tokens": 32,
        "image_text_hidden_size": 256,
        "image_token_index": 50265,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "use_decoder_only_language_model": True,
        "torch_dtype": "float32",
        "text_config": {
            "_name_or_path": "facebook/opt-2.7b",
            "architectures": ["OPTForCausalLM"],
            "model_type": "opt",
            "vocab_size": 50304,
            "hidden_size": 2560,
            "word_embed_proj_dim": 2560,
            "ffn_dim": 10240,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "max_position_embeddings": 2048,
            "activation_function": "relu",
            "do_layer_norm_before": True,
            "enable_bias": True,
            "layer_norm_elementwise_affine": True,
            "dropout": 0.1,
            "attention_dropout": 0.0,
            "activation_dropout": 0.0,
            "pad_token_id": 1,
            "bos_token_id": 2,
            "eos_token_id": 50118,
            "tie_word_embeddings": True,
            "torch_dtype": "float16",
        },
        "qformer_config": {
            "model_type": "blip_2_qformer",
            "vocab_size": 30522,
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1,
            "max_position_embeddings": 512,
            "layer_norm_eps": 1e-12,
            "pad_token_id": 0,
            "cross_attention_frequency": 2,
            "encoder_hidden_size": 1408,
        },
        "vision_config": {
            "model_type": "blip_2_vision_model",
            "hidden_size": 1408,
            "intermediate_size": 6144,
            "num_hidden_layers": 39,
            "num_attention_heads": 16,
            "image_size": 224,
            "patch_size": 14,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-06,
            "qkv_bias": True,
        },
    },
    # text vocab 50304: OPT's 50272 padded to a multiple of 64 when the <image> token (50265) was added.
    "published_params": 3_744_761_856,
    "source": "Hub safetensors metadata of Salesforce/blip2-opt-2.7b (model page: 'Model size 3.74B params')",
}

# --- InternVL3 (InternViT-300M + pixel-shuffle MLP projector + Qwen2.5) ---------
CATALOGUE["internvl3-2b"] = {
    "hub_id": "OpenGVLab/InternVL3-2B-hf",
    "config": {
        "architectures": ["InternVLForConditionalGeneration"],
        "model_type": "internvl",
        "image_token_id": 151667,
        "image_seq_length": 256,
        "downsample_ratio": 0.5,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "text_config": {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": 151674,
            "hidden_size": 1536,
            "intermediate_size": 8960,
            "num_hidden_layers": 28,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "hidden_act": "silu",
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-06,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": 70,
            "attention_dropout": 0.0,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        },
        "vision_config": _internvit_300m(),
    },
    "published_params": 2_088_957_440,
    "source": "Hub safetensors metadata of OpenGVLab/InternVL3-2B-hf (model page: 'Model size 2.09B params')",
}


for _name, _entry in CATALOGUE.items():
    _entry["name"] = _name  # the catalogue key, so an entry found by hub id knows its name
del _name, _entry


# ---------------------------------------------------------------------------
# API
# ---------------------------------------------------------------------------

def names() -> list[str]:
    """Catalogue names, in catalogue order."""
    return list(CATALOGUE)


def _resolve(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"catalogue name must be a str, got {type(name).__name__}")
    key = name.strip().lower()
    if key in CATALOGUE:
        return key
    for k, e in CATALOGUE.items():
        hub = e["hub_id"].lower()
        if key == hub or key == hub.rsplit("/", 1)[-1]:  # "org/name" or just "name"
            return k
    choices = list(CATALOGUE) + [e["hub_id"] for e in CATALOGUE.values()]
    lowered = {c.lower(): c for c in choices}
    close = [lowered[c] for c in difflib.get_close_matches(key, list(lowered), n=5, cutoff=0.5)]
    if not close:  # e.g. "qwen2-vl" -> every name that contains it
        close = [c for c in choices if key and key in c.lower()][:5]
    hint = f" Did you mean: {', '.join(repr(c) for c in close)}?" if close else ""
    raise KeyError(f"{name!r} is not in the vlmlab catalogue.{hint} Known names: {', '.join(CATALOGUE)}.")


def entry(name: str) -> dict:
    """The catalogue entry for ``name``: a catalogue key, or a hub id (``org/name`` or just
    ``name``), case-insensitive.

    Returns the entry dict itself (``name`` (the catalogue key), ``hub_id``, ``config``,
    ``published_params``, ``source``): the same object on every call, so treat it as read-only
    (``copy.deepcopy`` it to edit).  Raises ``KeyError`` listing close matches
    when the name is unknown.
    """
    return CATALOGUE[_resolve(name)]


def build_config(name: str):
    """A ``transformers`` config object for catalogue entry ``name`` (no network)."""
    from transformers import AutoConfig

    config = copy.deepcopy(entry(name)["config"])
    model_type = config.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **config)
    cfg.name_or_path = entry(name)["hub_id"]
    return cfg


def _model_class(config):
    """The class that the published checkpoint loads into (its ``architectures`` entry)."""
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return None


def build_meta_model(config, *, include_buffers: bool = False):
    """Build ``config``'s model with every parameter on the ``meta`` device.

    ``config`` is a transformers config, or a catalogue name / hub id.  The model
    class is ``AutoModelForImageTextToText`` (falling back to
    ``AutoModelForVision2Seq`` where that still exists, then the concrete class
    named in ``config.architectures``, e.g. for BLIP-2).  Weights get no storage;
    the result is meant for module trees, parameter counts and device-map
    planning.  Parameters get ``config.dtype`` (the checkpoint's dtype).

    Buffers (rotary ``inv_freq``, ``position_ids``, ...; a few KiB in all) stay
    real CPU tensors, as with ``accelerate.init_empty_weights()``'s default,
    since checkpoints do not hold the non-persistent ones; pass
    ``include_buffers=True`` to put them on ``meta`` as well.
    """
    import torch
    import transformers
    from accelerate import init_empty_weights

    if isinstance(config, str):
        config = build_config(config)

    factories = []
    for auto_name in ("AutoModelForImageTextToText", "AutoModelForVision2Seq"):
        auto_cls = getattr(transformers, auto_name, None)
        if auto_cls is not None and type(config) in getattr(auto_cls, "_model_mapping", {}):
            factories.append(auto_cls.from_config)
    cls = _model_class(config)
    if cls is not None:
        factories.append(cls._from_config)
    if not factories:
        raise ValueError(f"no image-text-to-text model class is known for model_type {config.model_type!r}")

    dtype = getattr(config, "dtype", None)
    kwargs = {"dtype": dtype} if isinstance(dtype, torch.dtype) else {}
    with init_empty_weights(include_buffers=include_buffers):
        model = factories[0](config, **kwargs)
    # init_empty_weights() re-wraps every parameter registered inside it, which unties the
    # lm_head from the token embeddings when the model ties them in its constructor
    # (include_buffers=False only); tying again outside the context restores the shared
    # Parameter.  It only ties what the config asks to tie.
    model.tie_weights()
    model.eval()
    return model
