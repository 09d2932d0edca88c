"""Caption-shaped inputs for any model that plans, without real images.

The family's own processor (the model folder's, or the registered class built locally from the
config: ``vlmlab.model.image_tokens``) turns a blank image of the plan's size into the prompt's
image tokens and its pixel inputs (``pixel_values``, ``image_grid_thw``, ``pixel_attention_mask``,
``aspect_ratio_ids`` ... whatever that processor writes). Random text tokens are added up to
``prompt_tokens`` and the pixels are drawn at random: what ``generate`` sees when captioning, for
measuring memory and speed of random-weight models before anything is downloaded.
"""
from __future__ import annotations

_TEXT_IDS = 10  # text tokens are drawn from [10, vocab - 10), away from the usual special ids


def image_token_id(config) -> int:
    from vlmlab.model.local_processor import _config_id

    value = _config_id(config, "image")
    if value is None:
        raise ValueError(f"{type(config).__name__} names no image token id")
    return int(value)


def caption_inputs(spec, batch_size: int = 1, prompt_tokens: int = 16, device="cpu", dtype=None, seed: int = 0,
                   image_size=None) -> dict:
    """``generate`` keyword arguments for a batch of caption-shaped prompts, one image each, at
    ``image_size`` (default: the size the spec's image tokens were counted for)."""
    import torch

    from vlmlab.model import image_tokens

    size = image_size or (tuple(spec.dims.image_size) if any(spec.dims.image_size) else None)
    counted = _counted(spec, size)
    if not counted.prompt_ids:
        raise image_tokens.ImageTokensUnknown(
            f"{spec.name}: its image tokens come from {counted.source}, not from a processor, so there is no "
            "prompt layout to copy for dummy inputs; load it from a folder with its processor files")
    # drawn where they are used: a batch of 171 photo-sized images is ~1 s of CPU time otherwise,
    # which a benchmark would count as the model's
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = dtype or torch.float32
    prompt = torch.tensor([counted.prompt_ids] * batch_size, device=device)
    special = torch.tensor(sorted(set(counted.prompt_ids)), device=device)
    text = torch.randint(_TEXT_IDS, max(spec.dims.vocab - _TEXT_IDS, _TEXT_IDS + 1), (batch_size, prompt_tokens),
                         generator=g, device=device)
    text[torch.isin(text, special)] = _TEXT_IDS  # never an image token or marker by chance
    ids = torch.cat([prompt, text], dim=1)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    for key, value in counted.inputs.items():
        if not hasattr(value, "dtype"):
            continue
        if key in ("mm_token_type_ids", "token_type_ids", "cross_attention_mask"):  # per prompt position
            pad = torch.zeros((batch_size, prompt_tokens, *value.shape[2:]), dtype=value.dtype)
            if key == "cross_attention_mask":  # the text after the image attends to it
                pad = value[:, -1:].expand(batch_size, prompt_tokens, *value.shape[2:]).clone()
            out[key] = torch.cat([value.expand(batch_size, *value.shape[1:]), pad], dim=1).to(device)
        elif value.is_floating_point() and not _is_mask(value):
            shape = (value.shape[0] * batch_size, *value.shape[1:])
            out[key] = torch.randn(shape, generator=g, device=device).to(dtype=dtype)
        else:
            out[key] = torch.cat([value] * batch_size, dim=0).to(device)
    return out


def _counted(spec, size):
    """The processor's output for one blank image at ``size``, counted once per spec and size:
    building a processor takes longer than a batch of a small model."""
    from vlmlab.model import image_tokens

    kept = spec.__dict__.setdefault("_dummy_counts", {})
    key = None if size is None else tuple(size)
    if key not in kept:
        kept[key] = image_tokens.count(spec.config, size, folder=spec.path)
    return kept[key]


def _is_mask(value) -> bool:
    """A float tensor of only 0 and 1 (Idefics3's pixel_attention_mask): repeated as it is, never drawn
    at random (a random mask leaves rows of a tile without patches, which index past the position table)."""
    return bool(value.numel()) and bool(((value == 0) | (value == 1)).all()) and bool(value.any())
