"""Caption-shaped inputs for any catalogue model, without a processor or real images.

A prompt of ``prompt_tokens`` text tokens plus the model's image tokens, and random pixels of the
vision tower's input size: what ``generate`` sees when captioning, for measuring memory and speed
of random-weight models before anything is downloaded.
"""
from __future__ import annotations


def image_token_id(config) -> int:
    for key in ("image_token_index", "image_token_id"):
        value = getattr(config, key, None)
        if value is not None:
            return int(value)
    raise ValueError(f"{type(config).__name__} names no image token id")


def caption_inputs(spec, batch_size: int = 1, prompt_tokens: int = 16, device="cpu", dtype=None, seed: int = 0) -> dict:
    """``generate`` keyword arguments for a batch of caption-shaped prompts."""
    import torch

    g = torch.Generator().manual_seed(seed)
    fam, cfg, d = spec.family.name, spec.config, spec.dims
    dtype = dtype or torch.float32
    vocab = d.vocab
    text = torch.randint(10, max(vocab - 10, 11), (batch_size, prompt_tokens), generator=g)
    if fam in ("llava", "paligemma", "internvl"):
        vc = cfg.vision_config
        size = vc.image_size[0] if isinstance(vc.image_size, (list, tuple)) else vc.image_size
        image_id = image_token_id(cfg)
        text[text == image_id] = image_id - 1
        ids = torch.cat([text[:, :1], torch.full((batch_size, d.image_tokens), image_id), text[:, 1:]], dim=1)
        pixels = torch.randn(batch_size, 3, size, size, generator=g)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                "pixel_values": pixels.to(device=device, dtype=dtype)}
    if fam == "qwen2_vl":
        vc = cfg.vision_config
        merge, patch, tpatch = vc.spatial_merge_size, vc.patch_size, getattr(vc, "temporal_patch_size", 2)
        side = int(round((d.image_tokens * merge * merge) ** 0.5))
        image_id = image_token_id(cfg)
        vision_start = getattr(cfg, "vision_start_token_id", image_id - 1)
        text[(text == image_id) | (text == vision_start)] = 10
        ids = torch.cat([text[:, :1], torch.full((batch_size, 1), vision_start),
                         torch.full((batch_size, d.image_tokens), image_id), text[:, 1:]], dim=1)
        patches = torch.randn(batch_size * side * side, 3 * tpatch * patch * patch, generator=g)
        grid = torch.tensor([[1, side, side]] * batch_size)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                "pixel_values": patches.to(device=device, dtype=dtype), "image_grid_thw": grid.to(device)}
    raise NotImplementedError(f"synthetic caption inputs are not written for the {fam} family yet; "
                              "use llava, paligemma, internvl or qwen2-vl models")
