"""Image tokens per image, counted by the model's own processor.

The number of tokens an image becomes is what the family's processor writes into ``input_ids``
(one image token per vision feature the model scatters into the prompt). With a model folder that
holds the processor's files, that processor is used as saved. From a config alone (catalogue, a
Hub config, a random-weight dry run) the processor class transformers registers for the
``model_type`` is built locally: its image processor from its own defaults, with the sizes the
model config states (vision ``image_size``, ``patch_size`` ...), and a minimal tokenizer that
knows the family's special tokens under the ids the config gives them. A blank image of the asked
size goes through it, and the image token ids are counted. Nothing here copies one family's
formula to another; a model whose processor cannot be built is refused with what was missing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from vlmlab.model.local_processor import (ProcessorUnavailable, _config_count, _config_id, _first_int, _image_id_fix,
                                          _kind, _sub, _with_tokenizer, build_processor)

# Dynamic-resolution families (Qwen2-VL, Idefics3, LLaVA-NeXT ...) turn a larger image into more
# tokens; unless told otherwise, plans assume a typical photo of this size (width, height).
DEFAULT_IMAGE_SIZE = (1024, 768)
PROMPT = "describe this photo"


class ImageTokensUnknown(ProcessorUnavailable):
    """The model's processor could not be built or run here; the message says what was missing."""


@dataclass
class ImageTokens:
    per_image: int  # image tokens the language model sees for one image
    vision_tokens: int  # tokens inside the vision encoder for one image (patches over all tiles)
    image_size: tuple[int, int]  # (width, height) of the image they were counted for
    source: str  # "processor (folder)", "processor (built from defaults)", "given"
    token_id: int | None = None  # the id that marks image positions in input_ids
    sequence_tokens: int = 0  # tokens the image adds to the prompt (image tokens, markers, row breaks)
    inputs: dict = field(default_factory=dict, repr=False)  # the processor's output for one image
    prompt_ids: list = field(default_factory=list, repr=False)  # input_ids of one captioning prompt with it


def normalise_size(image_size) -> tuple[int, int]:
    if image_size is None:
        return DEFAULT_IMAGE_SIZE
    if isinstance(image_size, int):
        return (image_size, image_size)
    try:
        w, h = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be (width, height) in pixels, got {image_size!r}") from None
    if w < 1 or h < 1:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return (w, h)


def count(config, image_size=None, folder=None, model=None) -> ImageTokens:
    """Image tokens per image for ``config`` at ``image_size`` (width, height): by the family's
    processor; else the count the config states; else (``model``: the meta-device model) by running
    the model's own image path on one image at the vision tower's native size."""
    size = normalise_size(image_size)
    return _count(config, size, folder, model)


META_PATH = "model image path on meta"


def _count(config, size, folder, model=None):
    try:
        return _count_with_processor(config, size, folder)
    except ProcessorUnavailable as err:
        fixed = _config_count(config)  # BLIP-2's query tokens: stated by the config, whatever the image
        if fixed is None:
            if model is not None:
                return _meta_path(model, config, size, str(err))
            raise ImageTokensUnknown(str(err)) from None
        vc = _sub(config, "vision_config")  # the encoder still sees every patch of its input size
        side, patch = _first_int(getattr(vc, "image_size", None)), _first_int(getattr(vc, "patch_size", None))
        patches = (side // patch) ** 2 if side and patch else fixed
        return ImageTokens(fixed, patches, size, "config (a fixed count per image)", _config_id(config, "image"), fixed)


def _count_with_processor(config, size, folder):
    processor, source = build_processor(config, folder)
    token_id = _image_token_id(processor, config)
    if token_id is None:
        raise ImageTokensUnknown(f"{_kind(config)}: its processor {type(processor).__name__} names no image token, "
                                 "so the image tokens per image cannot be counted; pass image_tokens=N")
    try:
        with_image = _run(processor, size, with_image=True)
    except Exception as err:  # noqa: BLE001 - a processor that wants a chat template or other inputs
        raise ImageTokensUnknown(f"{_kind(config)}: its processor {type(processor).__name__} did not process a "
                                 f"plain prompt with one image ({type(err).__name__}: {str(err)[:160]}); "
                                 "pass image_tokens=N") from None
    ids = with_image["input_ids"][0].tolist()
    n = sum(1 for i in ids if i == token_id)
    fix = _image_id_fix(processor, config, getattr(processor, "_vlmlab_tokens", None)) if n == 0 else {}
    if fix:  # the processor writes another token per image feature: give it the config's id
        tokens = {**processor._vlmlab_tokens, **fix}
        processor = _with_tokenizer(type(processor).__mro__[1], processor.image_processor, config, tokens)
        with_image = _run(processor, size, with_image=True)
        ids = with_image["input_ids"][0].tolist()
        n = sum(1 for i in ids if i == token_id)
    try:
        text_only = len(_run(processor, size, with_image=False)["input_ids"][0])
    except ValueError:  # a processor that wants an image with every prompt (PaliGemma)
        text_only = len(ids) - n
    if n == 0:
        raise ImageTokensUnknown(f"{_kind(config)}: its processor {type(processor).__name__} wrote no image token "
                                 f"(id {token_id}) for a {size[0]}x{size[1]} image; pass image_tokens=N")
    inputs = {k: v for k, v in with_image.items() if k not in ("input_ids", "attention_mask", "token_type_ids", "labels")}
    extra = len(ids) - text_only
    return ImageTokens(n, max(_vision_tokens(inputs, config), n), size, source, token_id, max(extra, n), inputs, ids)




def _vision_tokens(inputs: dict, config) -> int:
    """Patches the vision encoder sees: flattened patches (Qwen-style rows), else pixels / patch²."""
    pixels = inputs.get("pixel_values")
    if pixels is None or not hasattr(pixels, "shape"):
        return 0
    if pixels.ndim == 2:
        return int(pixels.shape[0])
    vc = _sub(config, "vision_config")
    patch = _first_int(getattr(vc, "patch_size", None)) or 14
    channels = 3
    return int(pixels.numel() // (channels * patch * patch))






def _run(processor, size, with_image: bool):
    from PIL import Image

    image_token = getattr(processor, "image_token", None)
    if with_image:
        image = Image.new("RGB", size, (120, 110, 100))
        text = f"{image_token} {PROMPT}" if isinstance(image_token, str) else PROMPT
        return processor(text=[text], images=[image], return_tensors="pt")
    return processor(text=[PROMPT], return_tensors="pt")


def _image_token_id(processor, config):
    cid = _config_id(config, "image")
    if cid is not None:
        return cid
    pid = getattr(processor, "image_token_id", None)
    if isinstance(pid, int):
        return pid
    token = getattr(processor, "image_token", None)
    if isinstance(token, str):
        return processor.tokenizer.convert_tokens_to_ids(token)
    return None


def _meta_path(model, config, size, why: str) -> ImageTokens:
    """Run ``get_image_features`` of the meta-device model on one image of the vision tower's native
    size and count the features it returns: what the model scatters into the prompt for it."""
    import torch

    vc = _sub(config, "vision_config")
    side = _first_int(getattr(vc, "image_size", None))
    features = getattr(model, "get_image_features", None)
    if not side or features is None:
        raise ImageTokensUnknown(f"{why}; and the model has no get_image_features / vision image_size to run its "
                                 "image path on the meta device") from None
    channels = getattr(vc, "num_channels", None) or 3
    import inspect

    extra = {}
    if "image_sizes" in inspect.signature(features).parameters:  # (height, width) of each image, on the CPU
        extra["image_sizes"] = torch.tensor([[side, side]])
    try:
        with torch.no_grad():
            out = features(pixel_values=torch.zeros(1, channels, side, side, device="meta"), **extra)
    except Exception as err:  # noqa: BLE001 - it needs more than pixels (image sizes, grids) or real data
        raise ImageTokensUnknown(f"{why}; running its image path on the meta device failed too ({type(err).__name__}: "
                                 f"{str(err)[:120]})") from None
    out = getattr(out, "pooler_output", out)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not hasattr(out, "shape") or out.dim() < 2:
        raise ImageTokensUnknown(f"{why}; its image path returned no feature tensor on the meta device") from None
    n = int(out.shape[-2])
    return ImageTokens(n, n, (side, side), f"{META_PATH} ({side}x{side}, one image; its processor may tile larger "
                       "images into more tokens)", _config_id(config, "image"), n)
