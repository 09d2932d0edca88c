"""Regional compilation: compile the stateless blocks of a language model's decoder layers.

A decoder layer's MLP and norms hold no state between calls and have the same code in every
layer, so one compiled graph serves all of them (``torch.compile`` lifts each layer's weights as
inputs), and compiling takes seconds instead of the minute a whole 7B forward takes. The attention
block is left eager: it indexes the KV cache by its ``layer_idx``, which would compile a graph per
layer. Which layers and blocks: read from the model (the layer list the plan reads, and the
children of a layer that neither are nor hold an attention module).
"""
from __future__ import annotations


def decoder_layers(model):
    """The language model's layer list, as the plan reads it (``model.introspect.read_roles``)."""
    from vlmlab.model.introspect import read_roles

    names = read_roles(model)["layers"]
    return model.get_submodule(names[0]) if names else None


def stateless_blocks(layer) -> list[tuple[str, object]]:
    """``(name, module)`` of a layer's children that keep nothing per call: not an attention
    module (anything with a ``layer_idx`` indexes the cache) and holding none, with weights."""
    blocks = []
    for name, child in layer.named_children():
        holds_cache_index = any(hasattr(m, "layer_idx") for m in child.modules())
        if not holds_cache_index and any(True for _ in child.parameters()):
            blocks.append((name, child))
    return blocks


def compile_blocks(model, compile_fn=None) -> list[str]:
    """Compile every stateless block of every decoder layer in place (``module.compile``); returns
    the block names of one layer (empty where there is nothing to compile). ``uncompile`` undoes it."""
    layers = decoder_layers(model)
    if layers is None:
        return []
    import torch

    names = []
    for layer in layers:
        for name, block in stateless_blocks(layer):
            # dynamic shapes after the first recompile: prompt lengths vary
            compiled = compile_fn(block._call_impl) if compile_fn is not None else torch.compile(block._call_impl)
            block._compiled_call_impl = _prompts_only(compiled, block._call_impl)
            if layer is layers[0]:
                names.append(name)
    return names


def _prompts_only(compiled, eager):
    """The compiled block for a prefill (many tokens a row), the eager one for a decode step (one
    token a row): there the host's guard checks per call cost more than fusing saves, and a step
    compiled whole (CUDA graphs) traces the eager code anyway."""
    def call(hidden, *args, **kwargs):
        many = getattr(hidden, "dim", lambda: 0)() >= 2 and hidden.shape[-2] > 1
        return (compiled if many else eager)(hidden, *args, **kwargs)
    return call


def uncompile(model) -> None:
    """Put every compiled block back to eager (after a compile error, say)."""
    for module in model.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
