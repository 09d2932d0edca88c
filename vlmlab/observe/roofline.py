"""Achieved TFLOP/s in prefill and GB/s in decode, against the card's peak (as gpt-fast reports).

Prefill is compute-bound: its work is the FLOPs of every linear layer over every prompt token,
plus attention scores, plus the vision tower over its patches. Decode is bandwidth-bound: each
step reads every language-model weight once and the whole KV cache of the batch. Dividing by the
measured time gives the achieved rate; dividing that by the card's datasheet peak
(``Gpu.bf16_tflops``, ``Gpu.bandwidth``) gives the percentage. Counts come from the model spec
(exact parameter counts per component, the config's shapes); times from a bench run or a Profile.
"""
from __future__ import annotations

from vlmlab.model.memory import DTYPES, compute_bytes


def prefill_flops(spec, batch: int, prompt_tokens: int) -> float:
    """FLOPs of one prefill over ``batch`` prompts of ``prompt_tokens`` tokens (image tokens
    included), one image each: 2 per multiply-add of every weight on every token it meets,
    causal attention scores and values, the vision tower over its patches, the head on the last
    position only (as ``generate`` computes it)."""
    if batch < 1 or prompt_tokens < 1:
        raise ValueError(f"batch and prompt_tokens must be positive, got {batch} and {prompt_tokens}")
    p, d = spec.params_by_component(), spec.dims
    decoder = p["layers"] + p["norm"]
    linear = 2 * decoder * prompt_tokens + 2 * _head_params(spec)
    attention = 2 * d.layers * d.heads * d.head_dim * prompt_tokens ** 2  # QK^T and AV, half of them (causal)
    vision = 2 * (p["vision"] + p["projector"]) * d.vision_tokens
    vision += 4 * d.vision_layers * d.vision_hidden * d.vision_tokens ** 2
    return float(batch * (linear + attention + vision))


def decode_bytes(spec, batch: int, kv_tokens: int, dtype: str = "bfloat16") -> float:
    """Bytes one decode step reads: the language model's weights (decoder layers, final norm,
    head) once, and K and V of ``kv_tokens`` positions for every sequence of the batch. With a
    static cache attention reads the whole cache, so ``kv_tokens`` is its length."""
    if batch < 1 or kv_tokens < 1:
        raise ValueError(f"batch and kv_tokens must be positive, got {batch} and {kv_tokens}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    p, d = spec.params_by_component(), spec.dims
    weights = (p["layers"] + p["norm"] + _head_params(spec)) * DTYPES[dtype]
    kv = 2 * d.layers * d.kv_heads * d.head_dim * kv_tokens * batch * compute_bytes(dtype)
    return float(weights + kv)


def _head_params(spec) -> int:
    p = spec.params_by_component()
    if p["head"]:
        return p["head"]
    return spec.dims.vocab * spec.dims.hidden if spec.tied_head else 0  # a tied head reads the embeddings


def decode_roofline_tokens_per_s(spec, gpu, batch: int = 1, kv_tokens: int = 1, dtype: str = "bfloat16") -> float | None:
    """The most tokens/s decode can give on ``gpu``: every step moves ``decode_bytes`` at the card's
    peak bandwidth and yields one token per sequence. None when the bandwidth is unknown."""
    bandwidth = getattr(gpu, "bandwidth", None)
    if not bandwidth:
        return None
    return batch * bandwidth * 1e9 / decode_bytes(spec, batch, kv_tokens, dtype)


def achieved(spec, gpu, *, batch: int, prompt_tokens: int, prefill_s: float | None = None,
             decode_step_s: float | None = None, kv_tokens: int | None = None, dtype: str = "bfloat16") -> dict:
    """Achieved rates and their share of ``gpu``'s peak, for a bench row or a Profile:
    ``prefill_tflops``, ``prefill_pct_peak``, ``decode_gbs``, ``decode_pct_peak`` (a value is None
    where its time or the card's peak is unknown). ``kv_tokens``: cached positions a decode step
    attends over (default: the prompt)."""
    out = {"prefill_tflops": None, "prefill_pct_peak": None, "decode_gbs": None, "decode_pct_peak": None}
    if prefill_s:
        tflops = prefill_flops(spec, batch, prompt_tokens) / prefill_s / 1e12
        out["prefill_tflops"] = tflops
        out["prefill_pct_peak"] = percent(tflops, getattr(gpu, "bf16_tflops", None))
    if decode_step_s:
        gbs = decode_bytes(spec, batch, kv_tokens or prompt_tokens, dtype) / decode_step_s / 1e9
        out["decode_gbs"] = gbs
        out["decode_pct_peak"] = percent(gbs, getattr(gpu, "bandwidth", None))
    return out


def percent(value: float | None, peak: float | None) -> float | None:
    return 100.0 * value / peak if value is not None and peak else None


def describe(rates: dict) -> str:
    """One line: 'prefill 512 TFLOP/s (52% of peak), decode 3900 GB/s (81% of peak)'."""
    parts = []
    for label, key, unit in (("prefill", "prefill", "TFLOP/s"), ("decode", "decode", "GB/s")):
        value = rates.get(f"{key}_tflops" if unit == "TFLOP/s" else f"{key}_gbs")
        if value is None:
            continue
        pct = rates.get(f"{key}_pct_peak")
        parts.append(f"{label} {value:.0f} {unit}" + (f" ({pct:.0f}% of peak)" if pct is not None else ""))
    return ", ".join(parts)
