"""Packed attention for vision towers that attend within windows, on PyTorch's own SDPA.

Qwen2-VL-style vision towers pack every image of a batch into one sequence and attend within
windows given by ``cu_seqlens``. Unless a flash-attention kernel is installed, transformers runs
one SDPA call per window (``torch.split`` then a Python loop): 256 photos make ~4,000 windows, so
a batch spends seconds of host time launching tiny kernels (qwen2.5-vl-7b, 256 images of 448x448
on an H200: 8.4 s of prefill for ~2.7 s of arithmetic). Here the windows are grouped by length and
each group is one batched SDPA call (photo batches have a handful of distinct window lengths).

transformers hands ``cu_seqlens`` to an attention function only when the implementation's name
says "flash" (``is_flash_attention_requested``), hence the name under which this one is
registered. ``use_packed_attention`` sets it on the configs of the modules whose ``forward``
takes ``cu_seqlens``, and nowhere else.
"""
from __future__ import annotations

import inspect

#: registered with transformers' AttentionInterface; "flash" makes transformers pass cu_seqlens
NAME = "flash_packed_sdpa_vlmlab"


def packed_sdpa(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                cu_seq_lens_q=None, cu_seq_lens_k=None, is_causal=False, **kwargs):
    """Attention within each packed sequence of ``query`` / ``key`` / ``value`` ([1, heads, tokens,
    dim]); returns ([1, tokens, heads, dim], None) as transformers' attention functions do."""
    import torch
    from torch.nn.functional import scaled_dot_product_attention

    packed = (cu_seq_lens_q is not None and attention_mask is None and query.shape[0] == 1
              and query.shape[1] == key.shape[1] and (cu_seq_lens_k is None or cu_seq_lens_k is cu_seq_lens_q
                                                      or torch.equal(cu_seq_lens_k, cu_seq_lens_q)))
    if not packed:  # nothing packed to split (or a layout this does not handle): transformers' SDPA
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      is_causal=is_causal, **kwargs)
    q, k, v = query[0], key[0], value[0]  # [heads, tokens, dim]
    heads, _, dim = q.shape
    out = torch.empty_like(q)
    starts, lengths = cu_seq_lens_q[:-1], cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]
    for length in lengths.unique().tolist():  # the only host sync: one per layer
        if length == 0:
            continue
        first = starts[lengths == length]
        rows = first.numel()
        index = (first[:, None] + torch.arange(length, device=q.device)).reshape(-1)
        group = [t[:, index].view(heads, rows, length, dim).transpose(0, 1) for t in (q, k, v)]
        o = scaled_dot_product_attention(*group, dropout_p=dropout, is_causal=is_causal, scale=scaling)
        out[:, index] = o.transpose(0, 1).reshape(heads, rows * length, dim)
    return out.transpose(0, 1).unsqueeze(0), None


def register() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, packed_sdpa)
    return NAME


def use_packed_attention(model) -> list[str]:
    """Route the attention of every transformers module whose ``forward`` takes ``cu_seqlens`` (and
    that would otherwise split it, i.e. not already on a flash kernel) through :func:`packed_sdpa`;
    returns the names of the modules changed (empty for a model without such a tower)."""
    from transformers.utils.generic import is_flash_attention_requested

    changed = []
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        native = type(module).__module__.startswith("transformers.")  # remote code may branch on the name itself
        if config is None or not native or "cu_seqlens" not in _parameters(type(module).forward):
            continue
        if getattr(config, "_attn_implementation", None) in ("sdpa", None) and not is_flash_attention_requested(config):
            register()
            config._attn_implementation_internal = NAME  # this tower's config only, not its parents'
        if getattr(config, "_attn_implementation", None) == NAME:
            changed.append(name)
    return changed


def _parameters(fn) -> tuple:
    try:
        return tuple(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return ()
