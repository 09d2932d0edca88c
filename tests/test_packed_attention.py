"""Packed vision attention: one SDPA call per window length gives what one call per window gives."""
from __future__ import annotations

import pytest

from vlmlab.run import packed_attention as pa


def _per_window(q, k, v, cu, scale):
    import torch
    from torch.nn.functional import scaled_dot_product_attention

    outs = [scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], scale=scale)
            for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    return torch.cat(outs, dim=2).transpose(1, 2)


def test_packed_equals_one_call_per_window():
    import torch

    g = torch.Generator().manual_seed(0)
    lengths = [16, 16, 9, 16, 4, 9, 16]  # windows of three lengths, not grouped in order
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    q, k, v = (torch.randn(1, 3, sum(lengths), 8, generator=g) for _ in range(3))
    out, weights = pa.packed_sdpa(None, q, k, v, scaling=0.3, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    assert weights is None and out.shape == (1, sum(lengths), 3, 8)
    torch.testing.assert_close(out, _per_window(q, k, v, cu, 0.3))


def test_without_windows_it_is_plain_sdpa():
    import torch
    from torch.nn.functional import scaled_dot_product_attention

    q = torch.randn(2, 3, 5, 8)
    module = torch.nn.Module()
    module.is_causal = False
    out, _ = pa.packed_sdpa(module, q, q, q, scaling=0.5)
    torch.testing.assert_close(out, scaled_dot_product_attention(q, q, q, scale=0.5).transpose(1, 2))


@pytest.mark.parametrize("family", ["qwen2_5_vl"])
def test_a_windowed_tower_is_switched_and_captions_are_unchanged(family, tmp_path):
    import torch
    from transformers import AutoModelForImageTextToText

    from tests.tiny_vlms import build
    from vlmlab.model.dummy_inputs import caption_inputs
    from vlmlab.model.spec import spec

    folder = build(family, tmp_path / family)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    inputs = caption_inputs(spec(str(folder)), 2, prompt_tokens=4, image_size=(96, 64))
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.inference_mode():
        before = model.generate(**inputs, **kw)
        changed = pa.use_packed_attention(model)
        after = model.generate(**inputs, **kw)
    assert changed and all(name.endswith("attn") and "visual" in name for name in changed)
    assert model.config.get_text_config()._attn_implementation == "sdpa"  # the language model keeps its own
    assert torch.equal(before, after)
    assert pa.use_packed_attention(model) == changed  # idempotent


def test_remote_code_is_left_alone():
    import torch

    class Config:
        _attn_implementation = "sdpa"

    class RemoteAttention(torch.nn.Module):  # a module defined outside transformers, e.g. trust_remote_code
        def __init__(self):
            super().__init__()
            self.config = Config()

        def forward(self, hidden_states, cu_seqlens):
            return hidden_states

    model = torch.nn.Sequential(RemoteAttention())
    assert pa.use_packed_attention(model) == [] and model[0].config._attn_implementation == "sdpa"
