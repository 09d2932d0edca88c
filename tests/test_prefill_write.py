"""The prefill's cache write as a slice copy: the cache ends as transformers' own write leaves it."""
from __future__ import annotations

from vlmlab.run import prefill_write as pw


def _cache(tiny_model, batch, length):
    import torch
    from transformers import StaticCache

    cache = StaticCache(config=tiny_model.config, max_cache_len=length)
    heads, dim = tiny_model._get_static_cache_init_shape()
    cache.early_initialization(batch_size=batch, num_heads=heads, head_dim=dim, dtype=torch.float32,
                               device=torch.device("cpu"))
    return cache


def test_prefill_then_decode_leave_the_cache_as_index_copy_does(tiny):
    import torch

    ms, model = tiny
    plain, sliced = _cache(model, 2, 16), _cache(model, 2, 16)
    assert pw.write_prefill_by_slice(sliced) == len(sliced.layers) > 0
    assert pw.write_prefill_by_slice(sliced) == 0  # wrapped once
    g = torch.Generator().manual_seed(0)
    heads, dim = model._get_static_cache_init_shape()
    for _ in range(2):  # the second round after a reset: the slice copy is armed again
        for cache in (plain, sliced):
            cache.reset()
        for n in (5, 1, 1):  # a prefill, then two decode steps
            k, v = (torch.randn(2, heads, n, dim, generator=g) for _ in range(2))
            for cache in (plain, sliced):
                out = cache.layers[0].update(k.clone(), v.clone())
            assert torch.equal(plain.layers[0].keys, sliced.layers[0].keys)
            assert torch.equal(plain.layers[0].values, sliced.layers[0].values)
            assert torch.equal(plain.layers[0].cumulative_length, sliced.layers[0].cumulative_length)
            assert out[0] is sliced.layers[0].keys


def test_the_fast_path_wraps_its_cache_and_tokens_equal_generate(tiny, monkeypatch):
    import torch

    from tests.conftest import tiny_inputs
    from vlmlab.run import fast_generate as fg

    sliced = []
    real = pw._wrap

    def counting(layer):
        real(layer)
        inner = layer.update

        def update(k, v, *a, **kw):
            sliced.append(layer._vlmlab_empty and k.shape[-2] > 1)
            return inner(k, v, *a, **kw)

        layer.update = update

    monkeypatch.setattr(pw, "_wrap", counting)
    ms, model = tiny
    gen = fg.FastGenerator(model, decode="eager")
    kw = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False}
    with torch.inference_mode():
        for seed in (0, 1):
            inputs = tiny_inputs(ms, 2, seed)
            assert torch.equal(gen.generate(inputs, **kw), model.generate(**inputs, **kw))
    layers = sum(1 for _ in gen._cache.layers)
    assert sum(sliced) == 2 * layers  # each call's prefill, in every layer
