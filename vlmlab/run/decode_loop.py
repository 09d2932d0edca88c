"""Greedy decoding in which the host never waits for the GPU between steps.

transformers' ``generate`` asks the GPU after every step whether all rows have finished
(``unfinished_sequences.max() == 0`` in ``_sample``), so the host cannot queue step n+1 while
step n runs: at batch 1 the GPU sits idle for the host's share of every step (the Python of
``prepare_inputs_for_generation``, the logits processors and the launch of the CUDA graph).
``greedy_without_sync`` is that same loop, run by ``generate`` itself through its
``custom_generate`` hook (so every family's input preparation, prefill and cache handling stay
transformers' own), with the stop check read once every ``CHECK_EVERY`` steps instead.

Rows that finished keep receiving the pad token, exactly as in ``generate``; the only visible
difference is that the output may end with up to ``CHECK_EVERY - 1`` more columns of pad tokens
after every row has stopped (callers cut captions at the first stop token anyway).
"""
from __future__ import annotations

from functools import partial

#: steps between two reads of "has every row stopped?" (each read makes the host wait for the GPU)
CHECK_EVERY = 8


def greedy_without_sync(model, input_ids, logits_processor, stopping_criteria, generation_config,
                        synced_gpus=False, streamer=None, decode_step=None, **model_kwargs):
    """A ``custom_generate`` callable for ``model.generate``: greedy search without a host sync per
    step. Sampling, beams, streamers and multi-process generation are left to ``generate``.

    ``decode_step`` (bind it with ``functools.partial``): a callable that runs a decode step's
    inputs in place of the model's forward, a :class:`~vlmlab.run.graphed_step.GraphedStep` say.
    It is refused (told why) where the step's mask would be built on the host."""
    import torch

    if generation_config.do_sample or (generation_config.num_beams or 1) > 1 or streamer is not None or synced_gpus:
        raise ValueError("greedy_without_sync decodes greedily on one process without a streamer; "
                         "call generate without custom_generate for sampling, beams or streaming")
    pad = generation_config._pad_token_tensor
    has_eos = any(hasattr(criterion, "eos_token_id") for criterion in stopping_criteria)
    if has_eos and pad is None:
        raise ValueError("generation with a stop token needs a pad token for the rows that stop first")
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    if pad is not None:
        pad = pad.to(input_ids.device)
    forward = (model.get_compiled_call(generation_config.compile_config)
               if model._valid_auto_compile_criteria(model_kwargs, generation_config) else model.__call__)
    outputs = model._prefill(input_ids, generation_config, model_kwargs, is_first_iteration=True)
    max_length = stopping_criteria.max_length
    slots = _cache_slots(model, model_kwargs)
    if slots is None and model_kwargs.get("attention_mask") is not None and hasattr(decode_step, "refuse"):
        # transformers would build the step's 4D mask from the 2D one, deciding on the host whether
        # it may skip it; without a 2D mask it makes it on the device from the cache positions
        decode_step.refuse("the decode step's mask is built on the host (a 2D mask without a static cache, "
                           "or sliding-window, chunked or non-SDPA attention)")
    steps = 0
    with model._optimize_model_for_decode():
        while True:
            if steps:
                step = _step_inputs(model, input_ids, model_kwargs, slots)
                outputs = decode_step(step) if decode_step is not None else forward(**step, return_dict=True)
            model_kwargs = model._update_model_kwargs_for_generation(
                outputs, model_kwargs, is_encoder_decoder=model.config.is_encoder_decoder)
            logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=input_ids.device)
            del outputs  # the prefill's logits can be large: let them go before the next step
            next_tokens = torch.argmax(logits_processor(input_ids, logits), dim=-1)
            if has_eos:
                next_tokens = next_tokens * unfinished + pad * (1 - unfinished)
            input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
            unfinished = unfinished & ~stopping_criteria(input_ids, None)
            steps += 1
            if max_length is not None and input_ids.shape[1] >= max_length:
                break
            if steps % CHECK_EVERY == 0 and not bool(unfinished.any()):  # the only host sync
                break
    return input_ids


def _cache_slots(model, model_kwargs):
    """``(allowed, positions)``: which static-cache slots each row may attend to ([batch, cache
    length]: its prompt's unpadded tokens, then every generated one) and the slot indices; or None
    where a decode step's mask is better left to transformers (no static cache, no 2D mask, an
    attention other than SDPA, sliding-window or chunked layers, an encoder-decoder).

    With them a decode step gets its 4D mask ready made: transformers would build it on the host
    from the 2D mask, and deciding whether it may skip it (``padding_mask.all()``) waits for the GPU
    every step."""
    import torch

    from vlmlab.run import gqa_decode

    text = model.config.get_text_config()
    cache = next((model_kwargs[k] for k in ("past_key_values", "cache") if model_kwargs.get(k) is not None), None)
    mask = model_kwargs.get("attention_mask")
    plain = (not model.config.is_encoder_decoder and getattr(text, "_attn_implementation", None) in ("sdpa", gqa_decode.NAME)
             and not getattr(text, "sliding_window", None) and not getattr(text, "attention_chunk_size", None)
             and all(t == "full_attention" for t in (getattr(text, "layer_types", None) or [])))
    if not plain or cache is None or not getattr(cache, "is_compileable", False) or mask is None or mask.ndim != 2:
        return None
    layers = getattr(cache, "layers", None) or [None]
    length = getattr(cache, "max_cache_len", None) or getattr(layers[0], "max_cache_len", None)  # 5.17, 5.24
    if not isinstance(length, int) or length < mask.shape[1]:
        return None
    allowed = torch.ones(mask.shape[0], length, dtype=torch.bool, device=mask.device)
    allowed[:, :mask.shape[1]] = mask.bool()
    return allowed, torch.arange(length, device=mask.device)


def _step_inputs(model, input_ids, model_kwargs, slots) -> dict:
    if slots is None:
        return _per_step(model.prepare_inputs_for_generation(input_ids, next_sequence_length=1, **model_kwargs))
    vars(model)["create_masks_for_generate"] = _as_given  # the 2D mask passes through untouched
    try:
        step = model.prepare_inputs_for_generation(input_ids, next_sequence_length=1, **model_kwargs)
    finally:
        vars(model).pop("create_masks_for_generate", None)
    allowed, positions = slots
    step["attention_mask"] = (allowed & (positions <= input_ids.shape[1] - 1))[:, None, None, :]
    return _per_step(step)


#: inputs with a value per token that a step gets for its own tokens only
_PER_TOKEN = ("token_type_ids", "mm_token_type_ids", "moe_mm_token_type_ids")


def _per_step(step: dict) -> dict:
    """The per-token inputs cut to the step's tokens, as transformers 5.24 cuts them in
    ``prepare_inputs_for_generation``; 5.17 hands ``mm_token_type_ids`` over whole, so it grows by
    a column every step (Qwen2.5-VL), which no fixed-shape CUDA graph can take. In a decode step the
    models read them only for the new tokens (their 3D positions come from the prefill's deltas)."""
    ids = step.get("input_ids")
    if ids is None or ids.ndim != 2:
        return step
    for name in _PER_TOKEN:
        value = step.get(name)
        if value is not None and getattr(value, "ndim", 0) >= 2 and value.shape[-1] > ids.shape[1]:
            step[name] = value[..., -ids.shape[1]:].contiguous()
    return step


def _as_given(attention_mask=None, **_):
    return attention_mask


def without_sync(model, kwargs: dict, decode_step=None) -> dict:
    """``kwargs`` for ``model.generate`` with ``custom_generate=greedy_without_sync`` added where it
    applies: greedy search, no streamer, and transformers' own ``generate`` (remote code that
    overrides it takes its own keywords). ``decode_step`` is handed to it (see there)."""
    from transformers import GenerationMixin

    greedy = not kwargs.get("do_sample") and kwargs.get("num_beams", 1) == 1 and "streamer" not in kwargs
    native = getattr(type(model), "generate", None) is GenerationMixin.generate
    if greedy and native and "custom_generate" not in kwargs:
        loop = greedy_without_sync if decode_step is None else partial(greedy_without_sync, decode_step=decode_step)
        return {**kwargs, "custom_generate": loop}
    return kwargs
