"""Rotary position embedding in three kernels, for models in half precision on a GPU.

transformers applies the rotary embedding as ``q * cos + rotate_half(q) * sin``, where
``rotate_half`` negates one half and concatenates the halves: five or six elementwise kernels per
tensor, each reading and writing the whole query or key, on a transposed (strided) layout. In a
prefill that is a tenth of the kernel time: for llava-1.5-7b at batch 171 on an H200, 370 ms of a
2.69 s prefill (a strided multiply 178 ms, the concatenation 131 ms, another multiply 62 ms;
benchmarks/results/gpu_fast_path.txt). The same result is ``out = q * cos`` followed by one fused
multiply-add into each half (``addcmul_``): three kernels and about half the memory traffic,
nothing compiled, so it pays from the first batch.

Which functions: the module-level ``apply_rotary_pos_emb`` of each transformers modeling module
whose layers the model uses, checked on a random input against itself (an interleaved or partial
rotation fails the check and is left alone). The forward of an attention layer calls that module
global, so the replacement is per modeling module, not per model: it takes the short path only for
CUDA tensors in float16/bfloat16 with ``cos`` as wide as ``q``, and calls the original for
everything else. The result differs from the original by rounding only.
"""
from __future__ import annotations

import sys

#: largest difference from the original accepted on the check (relative to its scale)
TOLERANCE = 2e-2
_ARGS = ("q", "k", "cos", "sin")
_OPTIONAL = {"position_ids", "unsqueeze_dim"}
#: modeling module name -> its own apply_rotary_pos_emb, while the replacement is in place
_ORIGINALS: dict[str, object] = {}


def use_fast_rotary(model, device_types=("cuda",)) -> list[str]:
    """Replace ``apply_rotary_pos_emb`` in the modeling modules of ``model``'s layers that sit on
    ``device_types`` in half precision and pass the check; returns those modules' names."""
    import torch

    done, seen = [], set()
    for module in model.modules():
        name = type(module).__module__
        weight = next(module.parameters(), None)  # an attention layer holds its weights in child Linears
        if name in seen or not name.startswith("transformers.models.") or weight is None:
            continue
        if weight.device.type not in device_types or weight.dtype not in (torch.float16, torch.bfloat16):
            continue
        seen.add(name)
        modeling = sys.modules.get(name)
        original = _ORIGINALS.get(name) or getattr(modeling, "apply_rotary_pos_emb", None)
        if original is None or not _takes_plain_arguments(original):
            continue
        if name not in _ORIGINALS and not _same_as_original(original, weight.device, weight.dtype):
            continue
        _ORIGINALS[name] = original
        modeling.apply_rotary_pos_emb = _replacement(original, tuple(device_types))
        done.append(name)
    return done


def restore() -> None:
    """Put every replaced ``apply_rotary_pos_emb`` back."""
    for name, original in _ORIGINALS.items():
        setattr(sys.modules[name], "apply_rotary_pos_emb", original)
    _ORIGINALS.clear()


def rotate(x, cos, sin):
    """``x * cos + rotate_half(x) * sin`` as one multiply and a fused multiply-add into each half;
    ``cos`` and ``sin`` broadcast to ``x``."""
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out


def _replacement(original, device_types):
    import torch

    half = (torch.float16, torch.bfloat16)

    def apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        short = (q.device.type in device_types and q.dtype == k.dtype == cos.dtype == sin.dtype
                 and q.dtype in half and cos.shape[-1] == q.shape[-1] == k.shape[-1] and q.shape[-1] % 2 == 0)
        if not short:
            if position_ids is None:
                return original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
            return original(q, k, cos, sin, position_ids, unsqueeze_dim=unsqueeze_dim)
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return rotate(q, cos, sin), rotate(k, cos, sin)

    apply_rotary_pos_emb.__wrapped__ = original
    apply_rotary_pos_emb.__doc__ = f"vlmlab.run.fast_rotary's replacement of {getattr(original, '__module__', '?')}'s"
    return apply_rotary_pos_emb


def _takes_plain_arguments(fn) -> bool:
    import inspect

    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return False
    return tuple(params[:4]) == _ARGS and set(params[4:]) <= _OPTIONAL and "unsqueeze_dim" in params


def _same_as_original(original, device, dtype) -> bool:
    import torch

    from vlmlab.run.fused_norms import close

    generator = torch.Generator(device=device).manual_seed(0)
    q, k = (torch.randn(2, 3, 5, 8, generator=generator, device=device, dtype=dtype) for _ in range(2))
    cos, sin = (torch.randn(2, 5, 8, generator=generator, device=device, dtype=dtype) for _ in range(2))
    try:
        with torch.no_grad():
            expected = original(q, k, cos, sin, unsqueeze_dim=1)
            got = (rotate(q, cos.unsqueeze(1), sin.unsqueeze(1)), rotate(k, cos.unsqueeze(1), sin.unsqueeze(1)))
    except Exception:  # noqa: BLE001 - a rotation that cannot take this input is left alone
        return False
    if not (isinstance(expected, tuple) and len(expected) == 2 and all(torch.is_tensor(e) for e in expected)):
        return False
    return all(close(e, g, TOLERANCE) for e, g in zip(expected, got))
