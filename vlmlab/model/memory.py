"""The memory model: predicted bytes per device, by component.

Weights alone underestimate the peak badly. A captioning ``generate`` also holds the KV cache of
every sequence, the vision encoder's and the prefill's activations, the logits, and on a GPU the
CUDA context plus the caching allocator's slack. Every term is a formula over the config and the
workload, so each can be checked by hand (tests/test_memory.py does).
"""
from __future__ import annotations

from dataclasses import dataclass

GiB = 1024**3
MiB = 1024**2

DTYPES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "int8": 1.0, "int4": 0.5}
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32",
           "auto": "bfloat16", "8bit": "int8", "4bit": "int4", "nf4": "int4"}
# bitsandbytes NF4 with double quantisation: one 8-bit absmax per 64 weights (+ tiny second level).
INT4_OVERHEAD = 1 / 64
# CUDA context, cuBLAS workspace and loaded kernels on each GPU: NVML "used" minus torch's reserved
# memory, measured at 1.27-1.29 GiB on H200 with torch 2.11 / CUDA 13 (benchmarks/results/). A CPU
# worker pays no such cost.
CUDA_CONTEXT = 1300 * MiB
# The caching allocator reserves more than it hands out: tensors that outlive a layer (the KV cache)
# are cut from blocks freed by its temporaries, leaving pieces too small for the next ones. Measured
# reserved-minus-allocated was 15-37% of the dynamic part (KV cache + activations + logits) over 9
# families on an H200 (benchmarks/results/gpu_memory_any.txt; 31-37% for LLaVA-1.5-7B in
# gpu_memory_calibration.txt); 0.24 with a floor of 128 MiB (workspaces, block rounding: 0.1-0.5 GiB
# at batch 1) keeps all 26 runs there within +-5%.
ALLOCATOR_SLACK = 0.24
ALLOCATOR_FLOOR = 128 * MiB
# float32 temporaries per element while a vision tower applies rotary embeddings to q and k
ROTARY_FP32 = 5
# On the fast path (a whole model on one GPU, vlmlab.run.fast_generate) the static KV cache is allocated
# first, one block per layer, and never grows: the allocator's slack is what the prefill's temporaries
# leave. Those of the vision tower and those of the language model differ in size, so the blocks of
# one are not reused for the other: the reserved peak holds both (H200, torch 2.11: llava-1.5-7b at
# batch 1/171/256 and qwen2.5-vl-7b at 256, reserved minus allocated = the tower's own peak to within
# 2 GiB; benchmarks/results/gpu_fast_path.txt). What remains is 0-2 % of the dynamic part.
STATIC_SLACK = 0.02

COMPONENTS = ("vision", "projector", "embeddings", "layers", "norm", "head", "other",
              "kv_cache", "activations", "logits", "context")


def canonical_dtype(dtype) -> str:
    text = str(dtype).replace("torch.", "").lower()
    text = ALIASES.get(text, text)
    if text not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)} (or bf16, fp16, fp32, 8bit, 4bit)")
    return text


def compute_bytes(dtype: str) -> float:
    """Bytes per element of activations and KV cache: quantised weights still compute in 16 bits."""
    return 4.0 if dtype == "float32" else 2.0


@dataclass(frozen=True)
class Workload:
    batch_size: int = 1
    max_new_tokens: int = 64
    prompt_tokens: int = 16  # text tokens of a captioning prompt and chat template
    images_per_prompt: int = 1

    def prefill_tokens(self, dims) -> int:
        # an image adds its image tokens plus the markers around them (begin/end, row breaks)
        per_image = max(getattr(dims, "image_sequence", 0) or 0, dims.image_tokens)
        return self.prompt_tokens + self.images_per_prompt * per_image

    def total_tokens(self, dims) -> int:
        return self.prefill_tokens(dims) + self.max_new_tokens


def weight_bytes(unit, dtype: str) -> dict[str, float]:
    """Weight bytes of one placement unit by component. int8/int4 shrink nn.Linear weights except
    the head (bitsandbytes keeps the LM head in 16 bits); everything else stays in 16 bits."""
    if dtype in ("float32", "bfloat16", "float16"):
        return {c: n * DTYPES[dtype] for c, n in unit.params.items()}
    q = DTYPES[dtype] + (INT4_OVERHEAD if dtype == "int4" else 0.0)
    out = {}
    for c, n in unit.params.items():
        lin = 0 if c == "head" else unit.linear.get(c, 0)
        out[c] = lin * q + (n - lin) * 2.0
    return out


def kv_bytes_per_layer(dims, work: Workload, dtype: str, layer: int | None = None) -> float:
    """What decoder layer ``layer`` caches for the whole batch at the longest sequence: K and V of
    every token (full attention), of the last ``window`` tokens (sliding), of the image's vision
    tokens (cross-attention, mllama), or a recurrent state of fixed size (linear attention / SSM).
    Without a per-layer layout (or ``layer`` None) every layer is full attention."""
    kv = getattr(dims, "kv", ())
    cache = kv[layer] if layer is not None and layer < len(kv) else None
    b = compute_bytes(dtype)
    if cache is None or cache.kind == "full":
        heads, head_dim = (cache.kv_heads, cache.head_dim) if cache else (dims.kv_heads, dims.head_dim)
        return 2 * work.batch_size * work.total_tokens(dims) * heads * head_dim * b
    if cache.kind == "sliding":
        tokens = min(work.total_tokens(dims), cache.window or work.total_tokens(dims))
        return 2 * work.batch_size * tokens * cache.kv_heads * cache.head_dim * b
    if cache.kind == "cross":
        tokens = work.images_per_prompt * max(dims.vision_tokens, dims.image_tokens)
        return 2 * work.batch_size * tokens * cache.kv_heads * cache.head_dim * b
    if cache.kind == "linear":
        return work.batch_size * cache.state_elems * b
    return 0.0


def prefill_activation_bytes(dims, work: Workload, dtype: str) -> float:
    """Peak transient memory of one decoder layer during prefill (inference: temporaries die at once).
    Residual stream and norms (~4 x hidden), then the larger of the MLP (gate-activation, up and their
    product: 3 x intermediate) and attention (q, k, v, rotated copies, output: ~6 x hidden)."""
    tokens = work.batch_size * work.prefill_tokens(dims)
    width = 4 * dims.hidden + max(3 * dims.intermediate, 6 * dims.hidden)
    return tokens * width * compute_bytes(dtype)


def vision_activation_bytes(dims, work: Workload, dtype: str, keeps_hidden_states: bool) -> float:
    """Vision encoder peak: its MLP temporaries, plus every layer's hidden state when the family
    asks the tower for all of them (LLaVA selects layer -2 from ``output_hidden_states``)."""
    images = work.batch_size * work.images_per_prompt
    per_state = images * dims.vision_tokens * dims.vision_hidden * compute_bytes(dtype)
    kept = (dims.vision_layers + 1) if keeps_hidden_states else 2
    mlp = images * dims.vision_tokens * 2 * dims.vision_intermediate * compute_bytes(dtype)
    if getattr(dims, "vision_rotary", False):
        # rotary position embeddings in the tower (Qwen2-VL style) rotate q and k in float32: q, k, v plus
        # ~5 float32 temporaries per element of the width, more than the MLP's (measured on an H200:
        # qwen2-vl-2b at batch 64, 999 tokens per image, needed 9.4 GiB of activations; this gives 9.7)
        attention = images * dims.vision_tokens * dims.vision_hidden * (3 * compute_bytes(dtype) + ROTARY_FP32 * 4)
        return kept * per_state + max(mlp, attention, projector_activation_bytes(dims, work, dtype))
    return kept * per_state + max(mlp, projector_activation_bytes(dims, work, dtype))


def projector_activation_bytes(dims, work: Workload, dtype: str) -> float:
    """The projector's temporaries: its widest layer (plus the activation of it) over every feature the
    tower hands it. The features it sees are the tower's output regrouped to its input width (Qwen2-VL
    merges 4 patches into one 4 x 1280 row): tokens = vision tokens x vision width / projector input."""
    if not (dims.projector_in and dims.projector_width):
        return 0.0
    images = work.batch_size * work.images_per_prompt
    tokens = images * dims.vision_tokens * dims.vision_hidden / dims.projector_in
    return tokens * dims.projector_width * (dims.projector_wide + 1) * compute_bytes(dtype)


def rotary_fp32_bytes(dims, work: Workload) -> float:
    """The float32 temporaries of a rotary vision tower (0 without one). When the tower is the largest
    transient of its device, the allocator keeps them reserved through the bf16 prefill that follows:
    Qwen2-VL-2B on an H200 reserved this much beyond the usual slack at batch 1, 16 and 64
    (Qwen3-VL, whose KV cache outgrows its tower, did not)."""
    if not getattr(dims, "vision_rotary", False):
        return 0.0
    return work.batch_size * work.images_per_prompt * dims.vision_tokens * dims.vision_hidden * ROTARY_FP32 * 4


def embedding_activation_bytes(dims, work: Workload, dtype: str) -> float:
    """The embedded prompt, the projected image features and the merged copy (masked_scatter)."""
    return 3 * work.batch_size * work.prefill_tokens(dims) * dims.hidden * compute_bytes(dtype)


def logits_bytes(dims, work: Workload) -> float:
    """generate() keeps logits of the last position only, upcast to float32, plus a processed copy."""
    return 2 * work.batch_size * dims.vocab * 4.0


class DeviceLoad:
    """What one device holds, accumulated unit by unit so the planner can grow it cheaply."""

    def __init__(self, dims, work: Workload, dtype: str, *, is_cuda=True, keeps_vision_states=False,
                 static_cache=False):
        self.dims, self.work, self.dtype = dims, work, dtype
        self.is_cuda, self.keeps_vision_states = is_cuda, keeps_vision_states
        self.static_cache = static_cache  # the model keeps a static cache when it is whole on one GPU
        self.weights = dict.fromkeys(COMPONENTS[:7], 0.0)
        self.layers = 0
        self.layer_ids: list[int] = []
        self.has_input = self.has_head = False

    def add(self, unit) -> "DeviceLoad":
        for c, b in weight_bytes(unit, self.dtype).items():
            self.weights[c] += b
        self.layers += unit.layer is not None
        if unit.layer is not None:
            self.layer_ids.append(unit.layer)
        self.has_input |= unit.name == "input"
        self.has_head |= "head" in unit.params  # a tied head sits in the input unit with 0 params
        return self

    def copy(self) -> "DeviceLoad":
        new = DeviceLoad(self.dims, self.work, self.dtype, is_cuda=self.is_cuda,
                         keeps_vision_states=self.keeps_vision_states, static_cache=self.static_cache)
        new.weights, new.layers, new.layer_ids = dict(self.weights), self.layers, list(self.layer_ids)
        new.has_input, new.has_head = self.has_input, self.has_head
        return new

    @property
    def on_fast_path(self) -> bool:
        """Whether this device holds the whole model on a GPU with a static cache (the fast path)."""
        whole = self.has_input and self.has_head and self.layers >= self.dims.layers
        return self.static_cache and self.is_cuda and whole

    def breakdown(self) -> dict[str, float]:
        d, w, dt = self.dims, self.work, self.dtype
        out = dict.fromkeys(COMPONENTS, 0.0)
        out.update(self.weights)
        if self.on_fast_path:
            return self._static_breakdown(out)
        per_layer = [kv_bytes_per_layer(d, w, dt, i) for i in self.layer_ids]
        kv_layer = max(per_layer, default=0.0)
        out["kv_cache"] = sum(per_layer)
        tower = (vision_activation_bytes(d, w, dt, self.keeps_vision_states) + embedding_activation_bytes(d, w, dt)
                 if self.has_input else 0.0)
        # one layer's prefill temporaries, plus one K (or V) re-allocated as the cache grows
        text = prefill_activation_bytes(d, w, dt) + kv_layer / 2 if self.layers else 0.0
        out["activations"] = max(tower, text)
        out["logits"] = logits_bytes(d, w) if self.has_head else 0.0
        dynamic = out["kv_cache"] + out["activations"] + out["logits"]
        slack = ALLOCATOR_FLOOR + ALLOCATOR_SLACK * dynamic
        if self.has_input and tower > out["kv_cache"] + text:
            slack += rotary_fp32_bytes(d, w)  # the tower is the peak: its float32 blocks stay reserved
        out["context"] = (CUDA_CONTEXT + slack) if self.is_cuda else 0.0
        return out

    def _static_breakdown(self, out) -> dict[str, float]:
        """The fast path's peak: a cache of ``cache_length`` tokens for every sequence, and the tower's
        and the language model's prefill temporaries side by side (see STATIC_SLACK)."""
        from dataclasses import replace

        from vlmlab.model.static_cache import cache_length

        d, w, dt = self.dims, self.work, self.dtype
        prompt = w.prefill_tokens(d)
        cached = replace(w, max_new_tokens=cache_length(prompt, w.max_new_tokens) - prompt)
        out["kv_cache"] = sum(kv_bytes_per_layer(d, cached, dt, i) for i in self.layer_ids)
        tower = vision_activation_bytes(d, w, dt, self.keeps_vision_states) + embedding_activation_bytes(d, w, dt)
        out["activations"] = tower + rotary_fp32_bytes(d, w) + prefill_activation_bytes(d, w, dt)
        out["logits"] = logits_bytes(d, w)
        dynamic = out["kv_cache"] + out["activations"] + out["logits"]
        out["context"] = CUDA_CONTEXT + ALLOCATOR_FLOOR + STATIC_SLACK * dynamic
        return out

    def total(self) -> float:
        return sum(self.breakdown().values())


def device_memory(units, dims, work: Workload, dtype: str, **kw) -> dict[str, float]:
    """Predicted peak bytes on one device holding ``units``, by component."""
    load = DeviceLoad(dims, work, dtype, **kw)
    for u in units:
        load.add(u)
    return load.breakdown()
