"""Whether a model generates on vlmlab's fast path (a static KV cache allocated before the first
forward, its decode steps captured), read from the model's class, and how long that cache is.

transformers declares on each class whether it compiles as one graph (``_can_compile_fullgraph``)
and whether it keeps a transformers Cache. The fast generator (``vlmlab.run.fast_generate``) asks
this of the loaded model, together with where it sits; the memory model asks it of the model on
the meta device, since a static cache fills memory differently from a growing one.
"""
from __future__ import annotations

#: cache lengths are multiples of this, so prompts of slightly different lengths share a graph
CACHE_BUCKET = 64


def cache_length(prompt_tokens: int, max_new_tokens: int, bucket: int = CACHE_BUCKET) -> int:
    """Tokens the static cache holds: prompt plus new tokens, rounded up to ``bucket``."""
    if prompt_tokens < 1 or max_new_tokens < 1 or bucket < 1:
        raise ValueError(f"prompt_tokens, max_new_tokens and bucket must be positive, got "
                         f"{prompt_tokens}, {max_new_tokens}, {bucket}")
    need = prompt_tokens + max_new_tokens
    return -(-need // bucket) * bucket


def why_not_static(model, dtype: str | None = None) -> str | None:
    """Why ``model`` (loaded, or on the meta device) cannot keep a static cache and compile its
    step, or None where it can. ``dtype``: the plan's, for the model on meta (int8/int4 weights
    are bitsandbytes', which a loaded model's quantiser is asked about instead)."""
    cls = type(model)
    if not getattr(cls, "_can_compile_fullgraph", False):
        return f"{cls.__name__} does not declare torch.compile support (_can_compile_fullgraph)"
    supports_cache = getattr(cls, "_supports_default_dynamic_cache", None)
    if supports_cache is not None and not supports_cache():
        return f"{cls.__name__} keeps no transformers Cache, so it has no static cache"
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and not getattr(quantizer, "is_compileable", False):
        return f"its quantisation ({type(quantizer).__name__}) cannot be compiled"
    if quantizer is None and dtype in ("int8", "int4"):
        return f"its {dtype} weights (bitsandbytes) are not planned as compilable"
    return None


def keeps_static_cache(spec, dtype: str) -> bool:
    """Whether ``spec``'s model, whole on one GPU, generates with a static cache (the memory model's
    question: a static cache fills memory differently from a growing one)."""
    modules = getattr(spec, "modules", None)
    return modules is not None and why_not_static(modules, dtype) is None
