"""Inductor's freezing for a compiled decode step.

Frozen, the step holds the weights as constants, so inductor runs the products that share an input
(q, k, v; gate, up) as one, larger product: batch-1 llava-1.5-7b on an H200 decoded 220 tokens/s
frozen against 192 (benchmarks/results/gpu_fast_path.txt). The concatenated weights are a second
copy of most of the decoder's (the fast generator freezes only where free memory holds them), and
freezing does not mix with inductor's autotuning: frozen and autotuned, the same step decoded 97
tokens/s (max-autotune-no-cudagraphs; 227 unfrozen) and 128 (coordinate-descent tuning).
"""
from __future__ import annotations


def autotunes(options) -> bool:
    """Whether inductor will autotune its kernels: through the compile's options or its global config."""
    import torch._inductor.config as inductor_config

    keys = ("max_autotune", "max_autotune_gemm", "coordinate_descent_tuning")
    return any(options.get(k) or getattr(inductor_config, k, False) for k in keys)


def frozen(compiled):
    """``compiled`` called with inductor's freezing switched on: dynamo reads the global switch while
    it traces (to hold parameters as constants), not the compile's own options."""
    import torch._inductor.config as inductor_config

    def forward(*args, **kwargs):
        with inductor_config.patch(freezing=True):
            return compiled(*args, **kwargs)

    return forward
