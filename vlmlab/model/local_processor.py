"""The processor of a model type, built locally from a config when no processor files are at hand.

The class transformers registers for the ``model_type`` gets its image processor from its own
defaults, with the sizes the model config states, and a word-level tokenizer that knows the
family's special tokens under the ids the config gives them: each token attribute the processor
asks the tokenizer for (``boi_token``, ``image_token_id`` ...) is added and the build retried.
"""
from __future__ import annotations

import inspect
import re

_WORDS = ("describe", "this", "photo", "a", "the", "image", "of", "in", "and", "user", "assistant")


class ProcessorUnavailable(ValueError):
    """No processor could be built here; the message says what was missing."""


def _kind(config) -> str:
    return f"model_type {getattr(config, 'model_type', None)!r}"


def _first_int(value):
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return int(value) if isinstance(value, (int, float)) else None


def _sub(config, key):
    sub = getattr(config, key, None)
    if isinstance(sub, dict):
        from types import SimpleNamespace

        return SimpleNamespace(**sub)
    return sub if sub is not None else config


def build_processor(config, folder=None):
    """(processor, source): the folder's saved processor (without its video part where that needs
    torchvision: ``saved_processor.load_processor``), else the registered class built locally."""
    if folder is not None:
        from vlmlab.model.saved_processor import load_processor

        try:
            return load_processor(str(folder)), "processor (folder)"
        except Exception:  # noqa: BLE001 - no usable processor files: the class's defaults
            pass
    return _local_processor(config), "processor (built from defaults)"


def _class_names(mapping, model_type):
    value = mapping.get(model_type)
    if value is None:
        return []
    if isinstance(value, dict):  # transformers >= 5.2x: {"pil": ..., "torchvision": ...}; the torchvision one
        # first, as AutoImageProcessor picks it where torchvision is installed (without it, it is not importable
        # or falls back to the PIL class)
        return list(dict.fromkeys(value[k] for k in ("torchvision", "pil", *value) if value.get(k)))
    if isinstance(value, (list, tuple)):
        return [v for v in value if v]
    return [value]


def _resolve(names):
    import transformers
    from transformers.utils import logging as hf_logging

    for name in names:
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "requires torchvision; falling back to the PIL class": what we want
        try:
            cls = getattr(transformers, name, None)
        except Exception:  # noqa: BLE001 - a backend that is not installed (torchvision)
            cls = None
        finally:
            hf_logging.set_verbosity(level)
        if cls is not None and not getattr(cls, "_backends", None) == ("torchvision",):
            yield cls


def _registered(model_type):
    """(processor class names, image processor class names) transformers registers for the type; a
    part it lacks is looked up under the types that share its processor class, then under the types
    defined in the same transformers package (an omni model's "thinker" and the omni model)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    proc_names = _class_names(PROCESSOR_MAPPING_NAMES, model_type)
    image_names = _class_names(IMAGE_PROCESSOR_MAPPING_NAMES, model_type)
    if proc_names and not image_names:  # its processor class is registered; its image processor under a sibling type
        for other in PROCESSOR_MAPPING_NAMES:
            if other != model_type and set(_class_names(PROCESSOR_MAPPING_NAMES, other)) & set(proc_names):
                image_names = _class_names(IMAGE_PROCESSOR_MAPPING_NAMES, other)
                if image_names:
                    break
    if model_type in CONFIG_MAPPING_NAMES and not (proc_names and image_names):
        package = model_type_to_module_name(model_type)
        for other in CONFIG_MAPPING_NAMES:
            if other != model_type and model_type_to_module_name(other) == package:
                proc_names = proc_names or _class_names(PROCESSOR_MAPPING_NAMES, other)
                image_names = image_names or _class_names(IMAGE_PROCESSOR_MAPPING_NAMES, other)
    return proc_names, image_names


def image_processor_for(config):
    """The image processor transformers registers for the config's type, built from its defaults with
    the sizes the config states and checked on one image; ProcessorUnavailable if none can be."""
    return _image_processors(config, _registered(getattr(config, "model_type", None))[1], [])[0]


def _image_processors(config, image_names, errors):
    """Every registered image processor class that builds and runs here (at least one, or raise)."""
    built = []
    for image_cls in _resolve(image_names):
        try:
            image_processor = image_cls(**_image_processor_kwargs(image_cls, config))
            image_processor(images=[_blank()], return_tensors="pt")
        except Exception as err:  # noqa: BLE001 - e.g. a torchvision-only class without torchvision
            errors.append(f"{image_cls.__name__}: {type(err).__name__}: {str(err)[:120]}")
            continue
        built.append(image_processor)
    if not built:
        why = "; ".join(errors) or f"none of {image_names or 'its image processors'} can be imported here"
        raise ProcessorUnavailable(f"{_kind(config)}: no image processor could be built locally ({why})")
    return built


def _local_processor(config):
    proc_names, image_names = _registered(getattr(config, "model_type", None))
    if not proc_names or not image_names:
        missing = "processor class" if not proc_names else "image processor class"
        raise ProcessorUnavailable(f"{_kind(config)}: transformers registers no {missing} for it, so its image tokens "
                                 "cannot be counted from the config; load it from a folder with its processor files "
                                 "or pass image_tokens=N")
    errors = []
    try:
        image_processors = _image_processors(config, image_names, errors)
    except ProcessorUnavailable:
        image_processors = []
    for image_processor in image_processors:
        for proc_cls in _resolve(proc_names):
            try:
                return _with_tokenizer(proc_cls, image_processor, config)
            except Exception as err:  # noqa: BLE001
                errors.append(f"{proc_cls.__name__}: {type(err).__name__}: {str(err)[:160]}")
    if not errors:
        errors = [f"none of {image_names} can be imported here (torchvision missing?)"]
    raise ProcessorUnavailable(f"{_kind(config)}: its processor could not be built locally ({'; '.join(errors)}); "
                             "load the model from a folder with its processor files or pass image_tokens=N")


def _blank():
    from PIL import Image

    return Image.new("RGB", (64, 48))


# image-processor steps that need an optional library and do not change the image (UDOP's OCR of
# the words in it, pytesseract): turned off to count image tokens
OPTIONAL_STEPS = {"apply_ocr": False}


def _image_processor_kwargs(cls, config) -> dict:
    """The image processor's own size settings, set to what the model config says where it says it."""
    vc = _sub(config, "vision_config")
    out = {k: v for k, v in OPTIONAL_STEPS.items() if hasattr(cls, k)}
    image_size = _first_int(getattr(vc, "image_size", None))
    defaults = cls(**out)
    for key in ("patch_size", "temporal_patch_size", "merge_size", "spatial_merge_size"):
        value = getattr(vc, key, None)
        if value is None or not hasattr(defaults, key):
            continue
        if key == "spatial_merge_size" and hasattr(defaults, "merge_size"):
            out["merge_size"] = value
        out[key] = _first_int(value) if key == "patch_size" else value
    for key, default in vars(defaults).items():  # other settings the model config states by the same name
        if key.startswith("_") or key in out or key in ("size", "crop_size") or isinstance(default, (dict, bool)):
            continue
        value = getattr(config, key, None)
        if value is not None and not callable(value) and type(value) is type(default):
            out[key] = value
    seq = getattr(defaults, "image_seq_length", 0)
    if seq is None:  # PaliGemma: the processor reads the image processor's image_seq_length
        seq = _config_count(config)
        if seq:
            out["image_seq_length"] = seq
    if image_size:
        size = _as_dict(getattr(defaults, "size", None))
        if isinstance(size, dict) and ({"height", "width"} & set(size) or "shortest_edge" in size):
            if "shortest_edge" in size and "longest_edge" not in size:
                out["size"] = {"shortest_edge": image_size}
            elif {"height", "width"} <= set(size):
                out["size"] = {"height": image_size, "width": image_size}
        crop = _as_dict(getattr(defaults, "crop_size", None))
        if isinstance(crop, dict) and {"height", "width"} <= set(crop):
            out["crop_size"] = {"height": image_size, "width": image_size}
        tile = _as_dict(getattr(defaults, "max_image_size", None))
        if isinstance(tile, dict) and "longest_edge" in tile:
            out["max_image_size"] = {"longest_edge": image_size}
            if isinstance(size, dict) and "longest_edge" in size:
                out["size"] = {"longest_edge": size["longest_edge"] // tile["longest_edge"] * image_size}
    return out


def _as_dict(size):
    """An image processor's size setting as a plain dict of the keys it sets (SizeDict or dict)."""
    if size is None:
        return None
    if isinstance(size, dict):
        return {k: v for k, v in size.items() if v is not None}
    if hasattr(size, "__dataclass_fields__"):
        return {k: getattr(size, k) for k in size.__dataclass_fields__ if getattr(size, k) is not None}
    return None


# config fields that state a fixed number of image tokens per image
COUNT_FIELDS = ("mm_tokens_per_image", "image_seq_length", "num_image_tokens", "image_seq_len", "num_query_tokens",
                "query_num", "num_query_token", "resampler_n_latents")


def _config_count(config):
    for cfg in (config, _sub(config, "text_config"), _sub(config, "vision_config"), _sub(config, "perceiver_config")):
        for key in COUNT_FIELDS:
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


# ---- a minimal tokenizer with the family's special tokens ---------------------------------------

_TOKEN_ATTR = re.compile(r"^(\w+)_token$")


def _config_id(config, name: str):
    """The id a config gives special token ``name`` ('image' -> image_token_id / image_token_index)."""
    for cfg in (config, _sub(config, "text_config")):
        for key in (f"{name}_token_id", f"{name}_token_index", f"{name}_id", f"{name}_index"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def _tokenizer(tokens: dict, config):
    """A word-level tokenizer: a few words plus ``tokens`` {string: id or None} as special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # the config's special ids are kept for its tokens; plain words take the lowest free ids
    reserved = {i for i in tokens.values() if isinstance(i, int) and i >= 0}
    free = (i for i in range(10**9) if i not in reserved)
    vocab = {w: next(free) for w in ("[UNK]", "[PAD]", "[BOS]", "[EOS]", *_WORDS)}
    used = set(vocab.values())
    top = int(getattr(_sub(config, "text_config"), "vocab_size", None) or getattr(config, "vocab_size", 0) or 50000)
    fresh = top - 1
    specials = []
    for text, wanted in tokens.items():
        if wanted is None or wanted in used or wanted < 0:
            while fresh in used or fresh in reserved:  # never an id the config gives a later token
                fresh -= 1
            wanted = fresh
        vocab[text] = wanted
        used.add(wanted)
        specials.append(text)
    model = models.WordLevel(vocab=vocab, unk_token="[UNK]")
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   bos_token="[BOS]", eos_token="[EOS]")
    fast.add_special_tokens({"additional_special_tokens": specials})
    for text in specials:  # attributes such as tokenizer.image_token / image_token_id that processors read
        name = _token_names.get(text)
        if name:
            setattr(fast, f"{name}_token", text)
            setattr(fast, f"{name}_token_id", vocab[text])
    return fast


_token_names: dict[str, str] = {}  # "<image>" -> "image", filled as the processor names its tokens


def _with_tokenizer(proc_cls, image_processor, config, tokens=None):
    """Build ``proc_cls`` around a minimal tokenizer; each attribute the processor asks the tokenizer
    for (``boi_token``, ``image_token_id`` ...) becomes a special token with the config's id."""
    tokens: dict[str, int | None] = dict(tokens or {})
    kwargs = _processor_kwargs(proc_cls, config)
    lenient = _lenient(proc_cls)
    for _ in range(12):
        tokenizer = _tokenizer(tokens, config)
        try:
            processor = lenient(image_processor=image_processor, tokenizer=tokenizer,
                                **_other_parts(proc_cls, tokenizer), **kwargs)
        except KeyError as err:  # it looks a token up in the vocabulary by its text (Fuyu's '|SPEAKER|')
            text = err.args[0] if err.args else None
            if not isinstance(text, str) or text in tokens or " " in text:
                raise
            tokens[text] = None
            continue
        except (AttributeError, ValueError) as err:
            match = re.search(r"(?:has no attribute|missing required attribute) '?(\w+?)_token(_id)?\b", str(err))
            if not match:
                raise
            name = match.group(1)
            text = f"<{name}>"
            _token_names[text] = name
            tokens[text] = _config_id(config, name)
            continue
        for attr, value in list(vars(processor).items()):  # read at construction; None from here on
            if isinstance(value, _Absent):
                setattr(processor, attr, None)
        new = _processor_tokens(processor, config, tokens)
        if not new:
            processor._vlmlab_tokens = dict(tokens)
            return processor
        tokens.update(new)
    raise RuntimeError("the processor kept asking for new special tokens")


class _Absent:
    """Stands in for a part an image-and-text call never uses (a video processor, an audio feature
    extractor): the processor may read its settings at construction (MiniCPM-V reads the video
    processor's ``slice_mode``); each reads as None."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return None


def _lenient(proc_cls):
    """``proc_cls`` that accepts a stand-in for the parts an image-and-text call never uses (a video
    processor or an audio feature extractor, which may need libraries that are not installed)."""
    def check(self, name, argument):
        if argument is None or isinstance(argument, _Absent):
            return None
        return proc_cls.check_argument_for_proper_class(self, name, argument)

    return type(proc_cls.__name__, (proc_cls,), {"check_argument_for_proper_class": check})


def _other_parts(proc_cls, tokenizer) -> dict:
    params = inspect.signature(proc_cls.__init__).parameters
    out = {}
    for name, p in params.items():
        if name in ("self", "image_processor", "tokenizer") or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        if name.endswith("tokenizer"):
            out[name] = tokenizer
        elif name in ("video_processor", "feature_extractor"):
            out[name] = _Absent()
        elif p.default is inspect.Parameter.empty:
            out[name] = None
    return out


def _processor_tokens(processor, config, known: dict) -> dict:
    """Token strings the processor writes that the tokenizer does not know yet, with config ids."""
    new = {}
    for attr, value in vars(processor).items():
        m = _TOKEN_ATTR.match(attr)
        if m and isinstance(value, str) and value and value not in known and " " not in value:
            _token_names.setdefault(value, m.group(1))
            new[value] = _config_id(config, m.group(1))
    return new


def _image_id_fix(processor, config, tokens) -> dict:
    """The token the processor writes per image feature must carry the config's image id (InternVL
    writes ``<IMG_CONTEXT>``, not its ``<image>`` placeholder)."""
    cid, pid = _config_id(config, "image"), getattr(processor, "image_token_id", None)
    if cid is None or not tokens or not isinstance(pid, int) or pid == cid:
        return {}
    written = processor.tokenizer.convert_ids_to_tokens(pid)
    if not isinstance(written, str) or written not in tokens:
        return {}
    out = {written: cid}
    out.update({text: -1 for text, i in tokens.items() if i == cid and text != written})  # -1: a fresh id
    return out


def _processor_kwargs(proc_cls, config) -> dict:
    """Processor arguments the model config states under the same name (patch_size, image_seq_length,
    vision_feature_select_strategy ...)."""
    params = inspect.signature(proc_cls.__init__).parameters
    out = {}
    sources = [config, _sub(config, "vision_config"), _sub(config, "text_config")]
    for name in params:
        if name in ("self", "image_processor", "tokenizer", "chat_template", "video_processor", "kwargs"):
            continue
        for cfg in sources:
            value = getattr(cfg, name, None)
            if value is not None and not callable(value):
                out[name] = _first_int(value) if name == "patch_size" else value
                break
    if "num_additional_image_tokens" in params and "num_additional_image_tokens" not in out:
        out["num_additional_image_tokens"] = _class_tokens(config)
    per_image = [n for n in params if n in COUNT_FIELDS and n not in out]
    if per_image:  # tokens per image (or per tile) the config states under another name
        stated = _config_count(config) or _tile_tokens(config)
        if stated:
            out[per_image[0]] = stated
    return out


def _tile_tokens(config):
    """Tokens per tile of a pixel-shuffle connector (Idefics3): patches per tile / scale_factor²."""
    vc = _sub(config, "vision_config")
    size, patch = _first_int(getattr(vc, "image_size", None)), _first_int(getattr(vc, "patch_size", None))
    scale = getattr(config, "scale_factor", None)
    if size and patch and isinstance(scale, int) and scale > 0:
        return (size // patch) ** 2 // (scale * scale)
    ratio = getattr(config, "downsample_ratio", None)  # InternVL: pixel shuffle by a ratio
    if size and patch and isinstance(ratio, float) and 0 < ratio < 1:
        return int((size // patch) ** 2 * ratio * ratio)
    return (size // patch) ** 2 if size and patch else None  # the tower's patches per tile (LLaVA-OneVision)


def _class_tokens(config) -> int:
    """1 when the vision tower prepends a class token to its patches (CLIP), read from its module tree."""
    vc = getattr(config, "vision_config", None)
    if vc is None or isinstance(vc, dict):
        return 0
    try:
        from accelerate import init_empty_weights
        from transformers import AutoModel

        with init_empty_weights(include_buffers=True):
            tower = AutoModel.from_config(vc)
    except Exception:  # noqa: BLE001 - no registered vision model for this config: assume none
        return 0
    names = [n for n, _ in tower.named_parameters()]
    return int(any(n.endswith(("class_embedding", "cls_token")) for n in names))
