"""Image tokens counted by running the model's own image path on the meta device.

When a family's processor cannot count them (none is registered, it needs a library that is not
installed, or it writes no image token because the text model reads the image some other way),
the meta-device model is asked directly: ``get_image_features`` (what the model scatters into the
prompt), or, for a model without one, its vision module's forward (what an encoder-decoder or
prefix model's text side attends to per image). Its inputs are the ones its signature names: the
family's image processor's output for the image where that image processor can be built, else
made from the vision config (pixels at the tower's fixed ``image_size``, or, for a
dynamic-resolution signature asking for ``image_grid_thw`` / ``image_sizes`` ..., the image's own
size rounded to whole patches and merge windows). Floating inputs go to the meta device;
integer ones (grids, sizes) stay on the CPU, as the model's Python code reads them, and are moved
to meta where an operation mixes them with meta tensors.
"""
from __future__ import annotations

import inspect

from vlmlab.model.local_processor import ProcessorUnavailable, _first_int, _sub, image_processor_for

GRID_ARGS = ("image_grid_thw", "image_grid_hw", "grid_thw")  # flattened patches with a (t,) h, w grid
# (height, width) per image, in pixels or in patches
SIZE_ARGS = {"image_sizes": "pixels", "spatial_shapes": "patches", "target_sizes": "patches"}
TEMPORAL_KEYS = ("temporal_patch_size", "patch_temporal")  # patches stacked over time (Qwen-style rows)
MERGE_KEYS = ("spatial_merge_size", "merge_size", "merge_kernel_size")  # patches merged per side


class MetaPathFailed(ValueError):
    """The image path could not run on the meta device; the message says why."""


def count(model, config, size, vision=()) -> tuple[int, int, tuple[int, int], str]:
    """(features per image, patches inside the encoder, (width, height) run, how) for one image of
    ``size`` (width, height); ``vision``: the vision tower's module names (introspect roles), run
    where the model has no get_image_features (empty: get_image_features only)."""
    import torch

    fn, what, tower = _image_path(model, vision)
    params = inspect.signature(inspect.unwrap(getattr(fn, "forward", fn))).parameters
    vc = getattr(tower, "config", None) if tower is not None else None
    vc = vc if vc is not None and getattr(vc, "patch_size", None) is not None else _sub(config, "vision_config")
    failed = None
    for inputs, run, made_by in _inputs(config, vc, size, params):
        try:
            with torch.no_grad(), _meta_mix(), _all_kept():
                out = fn(**inputs)
            break
        except Exception as err:  # noqa: BLE001 - it reads values a meta tensor has not (data-dependent shapes)
            failed = failed or f"{type(err).__name__}: {str(err)[:120]}"
    else:
        raise MetaPathFailed(f"running its {what} on the meta device failed ({failed})")
    n = _rows(out, pooled=tower is None)
    if not n:
        raise MetaPathFailed(f"its {what} returned no feature tensor on the meta device")
    return n, max(encoder_patches(inputs, vc), n), run, f"{what}, inputs from {made_by}"


def _image_path(model, vision):
    """(callable, description, vision module or None): get_image_features, else the vision module."""
    features = getattr(model, "get_image_features", None)
    inner = getattr(getattr(model, "model", None), "get_image_features", None)
    if callable(features) and callable(inner) and _only_varargs(features):  # a wrapper passing *args on
        features = inner
    modules = dict(model.named_modules())
    tower = modules.get(vision[0]) if vision else None
    if callable(features):
        return features, "get_image_features", None
    if tower is not None:
        return tower, f"vision module {vision[0]!r}", tower
    raise MetaPathFailed("the model has no get_image_features and no vision module to run on the meta device")


def _only_varargs(fn) -> bool:
    kinds = {p.kind for name, p in inspect.signature(fn).parameters.items() if name != "self"}
    return kinds <= {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}


def _inputs(config, vc, size, params) -> list:
    """Candidate (keyword inputs, (width, height) they stand for, where they came from), best first."""
    from PIL import Image

    try:
        image_processor = image_processor_for(config)
        made = image_processor(images=[Image.new("RGB", size, (120, 110, 100))], return_tensors="pt")
        inputs = {k: v for k, v in made.items() if k in params and hasattr(v, "dtype")}
        if inputs.keys() & {"pixel_values", "flattened_patches"}:
            return [(_to_meta(inputs), size, f"its image processor {type(image_processor).__name__}")]
    except ProcessorUnavailable:
        pass
    return _from_config(vc, size, params, config)


def _from_config(vc, size, params, config=None) -> list:
    """Inputs made from the vision config. Flattened patches come in one of the two layouts
    transformers' image processors write (a row of C*t*p*p values, or a (C, p, p) tile per patch):
    both are candidates, tried in that order."""
    import torch

    patch = _first_int(getattr(vc, "patch_size", None))
    channels = getattr(vc, "num_channels", None) or getattr(vc, "in_channels", None) or 3
    side = _first_int(getattr(vc, "image_size", None))
    grid = next((k for k in GRID_ARGS if k in params), None)
    sizes = [k for k in SIZE_ARGS if k in params]
    if "pixel_values" not in params or not patch:
        raise MetaPathFailed(f"its image path takes {sorted(params)} and the vision config states no patch size "
                             "to make them from")
    if grid:  # Qwen-style: flattened patches, one row per patch, grouped by merge windows
        merge = _merge(vc, config)
        temporal = next((getattr(vc, k) for k in TEMPORAL_KEYS if getattr(vc, k, None)), 1)
        h, w = (_round(v, patch * merge) // patch for v in (size[1], size[0]))
        grids = {grid: torch.tensor([[1, h, w]] if grid.endswith("thw") else [[h, w]])}
        layouts = [(h * w, channels * temporal * patch * patch)] + [(h * w, channels, patch, patch)] * (temporal == 1)
        how = "the vision config (patch and merge sizes); its processor may resize differently"
        return [(_to_meta({"pixel_values": torch.zeros(*shape), **grids}), (w * patch, h * patch), how)
                for shape in layouts]
    if side and not sizes:  # a fixed-size tower: the processor resizes every image (or tile) to it
        return [(_to_meta({"pixel_values": torch.zeros(1, channels, side, side)}), (side, side),
                 "the vision config's image_size; a processor that tiles larger images makes more")]
    merge = _merge(vc, config)
    w, h = (_round(v, patch * merge) for v in size)
    inputs = {"pixel_values": torch.zeros(1, channels, h, w)}
    if "pixel_attention_mask" in params:  # NaFlex (SigLIP 2): one row per patch, a mask over the rows
        rows = (h // patch) * (w // patch)
        inputs = {"pixel_values": torch.zeros(1, rows, channels * patch * patch),
                  "pixel_attention_mask": torch.ones(1, rows, dtype=torch.long)}
    for key in sizes:
        inputs[key] = torch.tensor([[h // patch, w // patch]] if SIZE_ARGS[key] == "patches" else [[h, w]])
    return [(_to_meta(inputs), (w, h), "the vision config (patch size, the image's own size); its processor may "
             "resize or tile differently")]


def _merge(vc, config=None) -> int:
    """Patches merged per side into one feature (Qwen's spatial_merge_size, Kimi's merge_kernel_size),
    stated by the vision config or the model config (Mistral 3)."""
    for cfg in (vc, config):
        value = next((_first_int(getattr(cfg, k)) for k in MERGE_KEYS if getattr(cfg, k, None)), None)
        if value:
            return value
    return 1


def _round(value: int, unit: int) -> int:
    """``value`` to the nearest whole number of ``unit`` (at least one), as Qwen's smart_resize does."""
    return max(unit, round(int(value) / unit) * unit)


def _to_meta(inputs: dict) -> dict:
    """Image data on the meta device; grids, sizes and masks stay on the CPU for the code that reads them."""
    return {k: v.to("meta") if v.is_floating_point() and "mask" not in k else v for k, v in inputs.items()}


def _rows(out, pooled: bool) -> int:
    """Feature vectors per image: get_image_features' pooled output; a tower's projected sequence
    (a pooler output of one vector per token) or else its last hidden state, a (B, C, H, W)
    feature map counting H*W."""
    pooler = getattr(out, "pooler_output", None)
    if pooler is not None and (pooled or getattr(pooler, "ndim", 0) >= 3):
        out = pooler
    elif getattr(out, "last_hidden_state", None) is not None:
        out = out.last_hidden_state
    if isinstance(out, (tuple, list)):
        out = out[0] if out else None
    if not hasattr(out, "shape") or out.dim() < 2:
        return 0
    if out.dim() == 4 and not pooled:
        return int(out.shape[0] * out.shape[2] * out.shape[3])
    return int(out.numel() // out.shape[-1])


def encoder_patches(inputs: dict, vc) -> int:
    """Patches the vision encoder sees for ``inputs`` (an image processor's output): one per row where
    patches come as rows (Qwen's flattened patches, NaFlex's [batch, rows, C*p*p], flattened_patches),
    else pixels / (channels * patch²)."""
    pixels = inputs.get("pixel_values", inputs.get("flattened_patches"))
    if pixels is None or not hasattr(pixels, "shape"):
        return 0
    if pixels.dim() <= 3 or "flattened_patches" in inputs:
        return int(pixels.numel() // pixels.shape[-1])
    patch = _first_int(getattr(vc, "patch_size", None)) or 14
    return int(pixels.numel() // (pixels.shape[-3] * patch * patch))


def _all_kept():
    """Boolean-mask selections on meta tensors keep every element: one image, no padding, so every
    patch the masks cover is real (torch's own switch for a meta ``nonzero``)."""
    import contextlib

    try:
        from torch.fx.experimental import _config
    except ImportError:  # an older torch: such models stay refused
        return contextlib.nullcontext()
    if not hasattr(_config, "meta_nonzero_assume_all_nonzero"):
        return contextlib.nullcontext()
    return _config.patch(meta_nonzero_assume_all_nonzero=True)


def _meta_mix():
    """A torch function mode that moves CPU tensors onto the meta device where an operation mixes
    the two (position ids computed from a CPU grid times a meta frequency buffer), and keeps integer
    tensors on the CPU where the code itself moves them to meta before reading their values."""
    import torch
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_flatten, tree_map

    def to_meta(a):
        return a.to("meta") if isinstance(a, torch.Tensor) and not a.is_meta else a

    moves = (torch.as_tensor, torch.tensor, torch.Tensor.to)

    def kept_on_cpu(func, args, kwargs):
        """An integer CPU tensor (sizes, grids) the code moves to the meta device stays where its values
        can still be read (``.tolist()``); None for any other call."""
        source = args[0] if args else kwargs.get("data")
        if func not in moves or not isinstance(source, torch.Tensor) or source.is_meta or source.is_floating_point():
            return None
        rest = [*args[1:], *kwargs.values()]
        target = next((a for a in rest if isinstance(a, (str, torch.device))), None)
        if target is None or torch.device(target).type != "meta":
            return None
        dtype = next((a for a in rest if isinstance(a, torch.dtype)), None)
        return source.to(dtype) if dtype is not None else source

    class MetaMix(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            kept = kept_on_cpu(func, args, kwargs)
            if kept is not None:
                return kept
            flat, _ = tree_flatten((args, kwargs))
            tensors = [a for a in flat if isinstance(a, torch.Tensor)]
            if any(t.is_meta for t in tensors) and any(not t.is_meta and t.dim() > 0 for t in tensors):
                args, kwargs = tree_map(to_meta, (args, kwargs))
            return func(*args, **kwargs)

    return MetaMix()
