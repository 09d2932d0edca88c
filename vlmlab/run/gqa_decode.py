"""Decode steps of grouped-query attention without copying the KV cache.

A static cache needs an attention mask at every decode step (its unused tail is masked), and with a
mask transformers 5.17's SDPA path copies each key and value head once per query head that shares
it (``repeat_kv``) before the kernel runs: Qwen2.5-VL-7B (28 query heads on 4 KV heads) at batch 256
spent 49 ms a decode step on an H200 where reading its weights and cache takes ~5 ms
(benchmarks/results/gpu_fast_path.txt). transformers 5.24 folds the query heads of each KV head
into query rows instead (``pack_gqa``), so one query token attends over the cache as it is. This
module backports that fold where the installed transformers lacks it, for the modules that have
grouped KV heads (the language model's attention); everything else goes to transformers' SDPA.
"""
from __future__ import annotations

#: registered with transformers' AttentionInterface (and its mask interface, as SDPA's mask)
NAME = "sdpa_gqa_vlmlab"


def needed() -> bool:
    """Whether the installed transformers' SDPA path copies grouped KV heads for a decode step."""
    from transformers.integrations import sdpa_attention

    return not hasattr(sdpa_attention, "pack_gqa")


def gqa_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' SDPA attention, except that a single query token of a grouped-query layer with
    a mask attends with its query heads folded into rows of their KV head: ``query`` [batch, heads, 1,
    dim] becomes [batch, kv heads, heads per kv head, dim] against ``key`` / ``value`` as they are."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    fold = (groups > 1 and query.shape[2] == 1 and attention_mask is not None and not kwargs.get("softcap")
            and kwargs.get("position_bias") is None and not torch.compiler.is_compiling()
            and key.shape[-1] == value.shape[-1])
    if not fold:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    batch, heads, _, dim = query.shape
    rows = query.reshape(batch, heads // groups, groups, dim)
    mask = attention_mask  # [batch, 1, 1, keys] broadcasts over the rows; a per-head mask folds like the query
    if mask.shape[1] == heads:
        mask = mask.reshape(batch, heads // groups, groups, mask.shape[-1])
    out = torch.nn.functional.scaled_dot_product_attention(rows, key, value, attn_mask=mask, dropout_p=dropout,
                                                           scale=scaling)
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def register() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, gqa_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the masks SDPA gets, built the same way
    return NAME


def use_gqa_decode(model, force: bool = False) -> list[str]:
    """Route the causal self-attention of every transformers module with grouped KV heads on SDPA through
    :func:`gqa_sdpa`, where the installed transformers needs it (``force``: even where it does not,
    for tests); returns the names of the modules changed."""
    if not (force or needed()):
        return []
    changed = []
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        native = type(module).__module__.startswith("transformers.")
        grouped = getattr(module, "num_key_value_groups", 1) > 1 and getattr(module, "is_causal", False)
        if config is None or not native or not grouped:  # decoders' self-attention, not resamplers
            continue
        if getattr(config, "_attn_implementation", None) == "sdpa":
            register()
            config._attn_implementation_internal = NAME  # this config's modules (its decoder) only
        if getattr(config, "_attn_implementation", None) == NAME:
            changed.append(name)
    return changed
