"""RMSNorm layers on PyTorch's fused kernel, for models in half precision on a GPU.

transformers writes RMSNorm as five or six elementwise operations in float32 (cast, square,
mean, scale, cast back, times the weight). In a prefill every one of them reads and writes the
whole activation: for llava-1.5-7b at batch 171 that is ~15 GB of memory traffic per norm, two
norms a layer, a tenth of the prefill. ``torch.nn.functional.rms_norm`` does it in one kernel on
CUDA and compiles nothing, so it pays from the first batch.

Which layers: every module whose class name ends in "RMSNorm" and that has a 1-D weight and an
epsilon, checked on a random input against its own forward (a norm that scales by
``1 + weight``, Gemma's, or centres the input fails the check and is left alone). The result
differs from the eager one by rounding only (the weight is applied before the cast back, as
``torch.compile`` also does).
"""
from __future__ import annotations

from functools import partial

#: largest difference from the module's own forward accepted on the check (relative to its scale)
TOLERANCE = 2e-2


def fuse_rms_norms(model, device_types=("cuda",)) -> list[str]:
    """Run the RMSNorm layers of ``model`` that pass the check on ``F.rms_norm``; returns the class
    names fused. Only on ``device_types`` (a GPU) and in float16/bfloat16: elsewhere nothing changes
    (on the CPU torch's kernel is not fused, and the bundled model's float32 captions stay exact)."""
    import torch

    fused, checked = [], {}
    for module in model.modules():
        cls = type(module).__name__
        weight, eps = getattr(module, "weight", None), _epsilon(module)
        if not cls.endswith("RMSNorm") or eps is None or not isinstance(weight, torch.nn.Parameter):
            continue
        if weight.ndim != 1 or weight.device.type not in device_types or weight.dtype not in (torch.float16, torch.bfloat16):
            continue
        key = (type(module), weight.dtype)
        if key not in checked:
            checked[key] = _same_as_eager(module, weight, eps)
        if checked[key]:
            vars(module)["forward"] = partial(_rms_norm, module, eps)
            if cls not in fused:
                fused.append(cls)
    return fused


def unfuse(model) -> None:
    """Put every fused norm back on its own forward."""
    for module in model.modules():
        forward = vars(module).get("forward")
        if isinstance(forward, partial) and forward.func is _rms_norm:
            del vars(module)["forward"]


def _epsilon(module):
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def _rms_norm(module, eps, hidden_states):
    from torch.nn.functional import rms_norm

    return rms_norm(hidden_states, (hidden_states.shape[-1],), module.weight, eps)


def _same_as_eager(module, weight, eps) -> bool:
    import inspect

    import torch

    params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    if len(params) != 1 or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        return False  # a norm that takes more than the hidden states (a residual, say) is not one of these

    generator = torch.Generator(device=weight.device).manual_seed(0)
    x = torch.randn(4, weight.shape[0], generator=generator, device=weight.device, dtype=weight.dtype)
    try:
        with torch.no_grad():
            expected = module(x)
            got = _rms_norm(module, eps, x)
    except Exception:  # noqa: BLE001 - a norm whose own forward cannot take this input is left alone
        return False
    return torch.is_tensor(expected) and close(expected, got)


def close(expected, got, tolerance: float = TOLERANCE) -> bool:
    """Whether ``got`` has ``expected``'s shape and differs from it by at most ``tolerance`` of its
    scale (its largest magnitude, at least 1): the check a substitute kernel passes at load."""
    if expected.shape != got.shape:
        return False
    scale = expected.float().abs().max().clamp(min=1.0)
    return bool(((expected.float() - got.float()).abs().max() / scale) <= tolerance)
