"""Image tokens per image, counted by the model's own processor.

The number of tokens an image becomes is what the family's processor writes into ``input_ids``
(one image token per vision feature the model scatters into the prompt). With a model folder that
holds the processor's files, that processor is used as saved. From a config alone (catalogue, a
Hub config, a random-weight dry run) the processor class transformers registers for the
``model_type`` is built locally: its image processor from its own defaults, with the sizes the
model config states (vision ``image_size``, ``patch_size`` ...), and a minimal tokenizer that
knows the family's special tokens under the ids the config gives them. A blank image of the asked
size goes through it, and the image token ids are counted. Where no processor can count them, the
meta-device model's own image path does (``meta_image_path``). Nothing here copies one family's
formula to another; a model that neither can count is refused with what was missing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from vlmlab.model.local_processor import (_TOKEN_ATTR, ProcessorUnavailable, _config_count, _config_id, _first_int,
                                          _image_id_fix, _kind, _sub, _token_names, _with_tokenizer, build_processor)
from vlmlab.model.meta_image_path import encoder_patches

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


def count(config, image_size=None, folder=None, model=None, vision=()) -> ImageTokens:
    """Image tokens per image for ``config`` at ``image_size`` (width, height): by the family's
    processor; else (``model``: the meta-device model, ``vision``: its vision tower's module names) by
    running the model's own image path on the meta device; else the count the config states."""
    size = normalise_size(image_size)
    return _count(config, size, folder, model, tuple(vision))


META_PATH = "model image path on meta"


def _count(config, size, folder, model=None, vision=()):
    try:
        return _count_with_processor(config, size, folder)
    except ProcessorUnavailable as err:
        why = str(err)
    fixed = _config_count(config)  # BLIP-2's query tokens: stated by the config, whatever the image
    # the model's own image path first: a config's count field can be a stale default (GOT-OCR 2's
    # image_seq_length says 576; its image path makes 256 features); a vision encoder's output only where the
    # config states no count (InstructBLIP-Video's Q-Former makes its 32 query tokens of them)
    if model is not None:
        try:
            return _meta_path(model, config, size, why, vision if fixed is None else ())
        except ImageTokensUnknown:
            if fixed is None:
                raise
    if fixed is None:
        raise ImageTokensUnknown(why) from None
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
    failed = None
    try:
        with_image = _run(processor, size, with_image=True)
    except Exception as err:  # noqa: BLE001 - a processor that wants a chat template or other inputs
        failed = f"{type(err).__name__}: {str(err)[:160]}"
        with_image = _without_placeholder(processor, size)
        rebuilt = _with_unset_tokens(processor, config) if with_image is None else None
        if rebuilt is not None:  # it checks special tokens it read as None from the tokenizer (Gemma 4's boa)
            processor, with_image = rebuilt, _without_placeholder(rebuilt, size, placeholder=True)
    if with_image is None:
        raise ImageTokensUnknown(f"{_kind(config)}: its processor {type(processor).__name__} did not process a "
                                 f"plain prompt with one image ({failed}); pass image_tokens=N")
    ids = with_image["input_ids"][0].tolist()
    n = sum(1 for i in ids if i == token_id)
    tokens = getattr(processor, "_vlmlab_tokens", None)
    fix = _image_id_fix(processor, config, tokens) if n == 0 else \
        _repeated_token_fix(processor, tokens, token_id, ids, n)
    if fix:  # the processor writes another token per image feature: give it the config's id
        tokens = {**processor._vlmlab_tokens, **fix}
        processor = _with_tokenizer(type(processor).__mro__[1], processor.image_processor, config, tokens)
        with_image = _run(processor, size, with_image=True)
        ids = with_image["input_ids"][0].tolist()
        n = sum(1 for i in ids if i == token_id)
    try:
        text_only = len(_run(processor, size, with_image=False)["input_ids"][0])
    except (ValueError, TypeError):  # a processor that wants an image with every prompt (PaliGemma, PI0)
        text_only = len(ids) - n
    if n == 0:
        raise ImageTokensUnknown(f"{_kind(config)}: its processor {type(processor).__name__} wrote no image token "
                                 f"(id {token_id}) for a {size[0]}x{size[1]} image; pass image_tokens=N")
    inputs = {k: v for k, v in with_image.items() if k not in ("input_ids", "attention_mask", "token_type_ids", "labels")}
    extra = len(ids) - text_only
    patches = encoder_patches(inputs, _sub(config, "vision_config"))
    return ImageTokens(n, max(patches, n), size, source, token_id, max(extra, n), inputs, ids)




# an image placeholder written once next to a token repeated at least this often (a patch grid, not
# begin/end markers) is a placeholder: the features go where the repeated token is
PATCH_RUN = 16


def _repeated_token_fix(processor, tokens, token_id, ids, n) -> dict:
    """Llama 4 writes its ``<|image|>`` placeholder once and ``<|patch|>`` once per feature, and the
    model's image id is the patch token's: when the config's id was given to a token written once and
    another special token of the processor's is written PATCH_RUN times or more, that one gets the id."""
    if n != 1 or not tokens:
        return {}
    by_id = {processor.tokenizer.convert_tokens_to_ids(text): text for text in tokens}
    counts = {}
    for i in ids:
        if i != token_id and i in by_id:
            counts[by_id[i]] = counts.get(by_id[i], 0) + 1
    text = max(counts, key=counts.get) if counts else None
    if text is None or counts[text] < PATCH_RUN:
        return {}
    return {text: token_id, **{t: -1 for t, i in tokens.items() if i == token_id}}  # -1: a fresh id


def _without_placeholder(processor, size, placeholder=False):
    """The processor's output for a prompt without the image placeholder, for processors that put
    the image tokens in themselves (Florence-2); None if that fails too."""
    try:
        return _run(processor, size, with_image=True, placeholder=placeholder)
    except Exception:  # noqa: BLE001
        return None


def _with_unset_tokens(processor, config):
    """The processor rebuilt with a tokenizer that also defines each special token it read as None
    (``boa_token`` ...), under the config's id for it; None if it does not build."""
    unset = [m.group(1) for a, v in vars(processor).items() if v is None and (m := _TOKEN_ATTR.match(a))]
    if not unset or not hasattr(processor, "_vlmlab_tokens"):
        return None
    tokens = dict(processor._vlmlab_tokens)
    for name in unset:
        _token_names[f"<{name}>"] = name
        tokens[f"<{name}>"] = _config_id(config, name)
    try:
        return _with_tokenizer(type(processor).__mro__[1], processor.image_processor, config, tokens)
    except Exception:  # noqa: BLE001
        return None


def _run(processor, size, with_image: bool, placeholder: bool = True):
    from PIL import Image

    image_token = getattr(processor, "image_token", None)
    if with_image:
        image = Image.new("RGB", size, (120, 110, 100))
        text = f"{image_token} {PROMPT}" if isinstance(image_token, str) and placeholder else PROMPT
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


def _meta_path(model, config, size, why: str, vision=()) -> ImageTokens:
    """Count the features the meta-device model's own image path makes for one image
    (``meta_image_path``): what it scatters into the prompt, or what its text side attends to."""
    from vlmlab.model.meta_image_path import MetaPathFailed, count as run_on_meta

    try:
        n, patches, run, how = run_on_meta(model, config, size, vision)
    except (MetaPathFailed, ProcessorUnavailable) as err:
        raise ImageTokensUnknown(f"{why}; and {err}") from None
    return ImageTokens(n, patches, run, f"{META_PATH} ({run[0]}x{run[1]}, one image; {how})",
                       _config_id(config, "image"), n)
