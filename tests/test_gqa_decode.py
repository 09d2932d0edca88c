"""Grouped-query decode attention folded into rows: what transformers' SDPA gives, without the copies."""
from __future__ import annotations

import pytest

from vlmlab.run import gqa_decode as gq


class _Layer:
    is_causal = True

    def __init__(self, groups):
        self.num_key_value_groups = groups


@pytest.mark.parametrize("mask_heads", [1, 8])
def test_one_query_token_folded_equals_repeated_kv_heads(mask_heads):
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv

    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 8, 1, 16, generator=g)
    k, v = (torch.randn(3, 2, 10, 16, generator=g) for _ in range(2))
    mask = torch.rand(3, mask_heads, 1, 10, generator=g) > 0.3
    mask[..., 0] = True  # every row attends somewhere
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def counting(query, *a, **kw):
        calls.append(tuple(query.shape))
        return real(query, *a, **kw)

    torch.nn.functional.scaled_dot_product_attention = counting
    try:
        out, weights = gq.gqa_sdpa(_Layer(4), q, k, v, mask, scaling=0.25)
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
    want = real(q, repeat_kv(k, 4), repeat_kv(v, 4), attn_mask=mask, scale=0.25).transpose(1, 2)
    assert weights is None and calls == [(3, 2, 4, 16)]  # the query folded: 2 KV heads x 4 rows, no copies
    torch.testing.assert_close(out, want)


def test_prefill_and_ungrouped_layers_go_to_transformers_sdpa():
    import torch
    from torch.nn.functional import scaled_dot_product_attention

    q = torch.randn(2, 4, 5, 8)
    out, _ = gq.gqa_sdpa(_Layer(1), q, q, q, None, scaling=0.5, is_causal=True)
    torch.testing.assert_close(out, scaled_dot_product_attention(q, q, q, is_causal=True, scale=0.5).transpose(1, 2))


def test_installed_transformers_is_asked_not_assumed(monkeypatch):
    from transformers.integrations import sdpa_attention

    monkeypatch.delattr(sdpa_attention, "pack_gqa", raising=False)
    assert gq.needed()
    monkeypatch.setattr(sdpa_attention, "pack_gqa", lambda *a: None, raising=False)
    assert not gq.needed()


def test_every_tiny_family_decodes_the_same_tokens_through_the_fold(tiny_vlms, one_torch_thread, monkeypatch, made):
    """A static cache masks every decode step, which is where the fold runs: the tokens of each
    family's static-cache generate are unchanged, only its decoder's attention is switched, and the
    step is still captured (the fold is SDPA under another name: its mask is built on the GPU)."""
    import torch

    folded = []
    real = gq.gqa_sdpa

    def counting(module, query, key, value, attention_mask, **kw):
        folded.append(query.shape[2] == 1 and attention_mask is not None)
        return real(module, query, key, value, attention_mask, **kw)

    monkeypatch.setattr(gq, "gqa_sdpa", counting)
    from transformers import AutoModelForImageTextToText

    from tests.test_decode_loop import _batch
    from vlmlab.run import fast_generate as fg

    kw = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
    switched = []
    for family in sorted(tiny_vlms):
        model = AutoModelForImageTextToText.from_pretrained(tiny_vlms[family], dtype=torch.float32).eval()
        inputs = _batch(tiny_vlms[family], padded=False)
        folded.clear()
        with torch.inference_mode():
            before = fg.FastGenerator(model, decode="eager").generate(dict(inputs), **kw)
            changed = gq.use_gqa_decode(model, force=True)
            made.clear()
            after = fg.FastGenerator(model, decode="graphs").generate(dict(inputs), **kw)
        assert torch.equal(before, after), family
        if family in ("llava", "qwen2_5_vl"):
            assert made and made[-1].failed is None and made[-1].replays, (family, made and made[-1].failed)
        assert all("visual" not in n and "vision" not in n for n in changed), (family, changed)
        switched += [family] if changed and any(folded) else []
    assert "llava" in switched and "qwen2_5_vl" in switched, switched
