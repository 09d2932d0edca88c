"""The fast generation path: a static KV cache, decode steps replayed as CUDA graphs, and a host
that never waits.

``choose_generation`` picks the path from what the model and its placement allow, and says why;
``FastGenerator`` runs ``generate`` on it:

- one ``StaticCache`` per (batch, cache length), allocated and initialised before the first
  forward (static addresses for a CUDA graph), reset and reused by every later call of that shape;
- decoding through ``vlmlab.run.decode_loop.greedy_without_sync``: ``generate``'s own loop
  without its host sync per step, so the host queues step n+1 while the GPU runs step n;
- the decode step, per batch shape, replayed as a CUDA graph captured from the model's own
  forward (``vlmlab.run.graphed_step``: a few steps' time, nothing compiled), so the host's
  Python (~0.9 ms a layer) never bounds it; where the eager forward's small kernels would still
  weigh next to the step's memory traffic (small batches), the forward is compiled first
  (``decode_plan``; tens of seconds once per shape), if the run is long enough to pay that back
  (``follow_run``: callers that know their run say how many decode steps it takes). A step that
  cannot be captured (inputs that grow with the sequence, a cache with Python-side state) runs
  transformers' own compiled decode (torch.compile's "reduce-overhead" mode) instead, and
  ``fallbacks`` says so;
- prefills eager by default: the RMSNorms, a tenth of an eager prefill, already run on torch's fused
  kernel (``vlmlab.run.fused_norms``, at load), the rotary embedding, another tenth, in three kernels
  (``vlmlab.run.fast_rotary``, at load), and the compiled MLP blocks
  (``vlmlab.run.compiled_blocks``, ``prefill="blocks"``) save a further ~2 % for seconds of compile,
  which only runs of thousands of images pay back;
- the cache length is rounded up to ``CACHE_BUCKET`` tokens and callers pad a last, smaller
  batch to the batch of the last call (``padded_size``), so that a run captures each shape once.

``FastGenerator.compile_s`` records each shape's first call and ``on_compile`` lets a progress
bar say so. Anywhere else (the CPU, a model split over several GPUs, a model that does not declare
``torch.compile`` support, a quantisation that cannot be compiled) it is eager ``generate``
(through the same loop without host syncs).
"""
from __future__ import annotations

import inspect
import time

from vlmlab.model.static_cache import CACHE_BUCKET, cache_length, why_not_static  # noqa: F401 - part of this module's API

STATIC = "static+graphs"
EAGER = "eager"
MODES = ("auto", STATIC, EAGER)


def padded_size(n: int, compiled: int | None) -> int:
    """Rows to run for ``n`` inputs: a batch smaller than the compiled one is padded up to it
    (one wasted partial batch costs less than compiling a new shape)."""
    if n < 1:
        raise ValueError(f"a batch holds at least one input, got {n}")
    return compiled if compiled is not None and n < compiled else n


def even_batches(n: int, limit: int) -> int:
    """The batch size that splits ``n`` inputs into the fewest batches of at most ``limit``, as
    evenly as possible: 512 images with room for 192 run as 3 batches of 171, not 192+192+128
    (a last batch padded to 192 would waste 64 rows)."""
    if n < 1 or limit < 1:
        raise ValueError(f"n and limit must be positive, got {n} and {limit}")
    batches = -(-n // limit)
    return -(-n // batches)


def choose_generation(model, devices, requested: str | None = "auto") -> tuple[str, str]:
    """``(mode, reason)``: ``"static+graphs"`` where the model and its placement allow it, else
    ``"eager"`` with the reason. ``requested="static+graphs"`` raises instead of falling back."""
    if requested is None:
        requested = "auto"
    if requested not in MODES:
        raise ValueError(f"generation must be one of {', '.join(MODES)}, got {requested!r}")
    if requested == EAGER:
        return EAGER, "eager generate was asked for"
    reason = _why_not_static(model, devices)
    if reason is None:
        return STATIC, (f"{type(model).__name__} on one GPU: static KV cache, decode steps replayed as CUDA "
                        "graphs (compiled first where small kernels would weigh)")
    if requested == STATIC:
        raise ValueError(f"generation='static+graphs' is not possible here: {reason}")
    return EAGER, reason


def _why_not_static(model, devices) -> str | None:
    devices = list(devices)
    if not devices or not all(isinstance(d, int) for d in devices):
        return "not on a GPU: a compiled decode pays off through CUDA graphs"
    if len(devices) > 1:
        return f"split over {len(devices)} GPUs: the compiled path runs a model on one device"
    return why_not_static(model)


def cache_keyword(forward) -> str:
    """The name a model takes its Cache by, read from its ``forward``: ``cache`` in newer
    transformers 5 releases (5.24), ``past_key_values`` before (5.17); ``generate`` takes the same."""
    params = inspect.signature(forward).parameters
    return "cache" if "cache" in params else "past_key_values"


#: GPU time per decoder layer and step of the eager forward's small kernels (norms, rotary, cache
#: writes, activations; dozens a layer) replayed from a CUDA graph, beyond the step's memory
#: traffic; a compiled forward fuses most of them. Measured on an H200 for llava-1.5-7b (transformers
#: 5.17, benchmarks/results/gpu_fast_path.txt): 61 us a layer at batch 1, 73 at batch 171
EAGER_KERNELS_S_PER_LAYER = 65e-6
#: compile the decode step where the eager kernels would add more than this share to the step
COMPILE_ABOVE = 0.25
#: seconds a compiled decode step costs once (first call of llava-1.5-7b at batch 1 on an H200:
#: 27.6-31.3 s, the capture and a prefill included); a run shorter than its payback is not compiled
COMPILE_S_ESTIMATE = 30.0
#: share of the datasheet memory bandwidth a decode step reaches
ACHIEVED_BANDWIDTH = 0.8
PREFILLS = ("blocks", "decoder", "eager")
COMPILED, GRAPHS = "compiled", "graphs"
#: after a step could not be captured: transformers' own compiled decode (torch.compile's
#: "reduce-overhead" mode, whose CUDA graphs survive graph breaks), from the next call of that shape
REDUCE_OVERHEAD = "reduce-overhead"
DECODES = ("auto", COMPILED, GRAPHS, REDUCE_OVERHEAD, EAGER)
#: torch.compile mode of a "compiled" decode step (CUDA graphs are the GraphedStep's own)
COMPILE_MODE = "default"
#: a compiled decode step on a GPU holds the weights as constants (``vlmlab.run.freezing``), where
#: free memory holds a second copy of them and inductor does not autotune
FREEZE_WEIGHTS = True
#: what ``generation_for`` builds (benchmarks set these to compare the variants)
DEFAULT_PREFILL, DEFAULT_DECODE = "eager", "auto"


def decode_plan(weight_bytes: float, cache_bytes: float, layers: int, bandwidth_gbs: float | None,
                steps: int | None = None) -> tuple[str, str]:
    """``(how, why)`` a decode step runs on a GPU: always replayed as a CUDA graph (captured in a few
    steps' time, so the host never bounds it); ``"compiled"`` where the eager forward's small kernels
    would add more than ``COMPILE_ABOVE`` to the step's memory traffic (small batches: tens of
    seconds of compile fuse them) and, when the run's decode ``steps`` are known, the time they
    save pays ``COMPILE_S_ESTIMATE`` back; else ``"graphs"`` (the eager forward's kernels, nothing
    compiled). A step reads every weight once and the static cache whole."""
    if not bandwidth_gbs:
        return GRAPHS, "unknown memory bandwidth: the eager decode step replayed as a CUDA graph"
    traffic_s = (weight_bytes + cache_bytes) / (ACHIEVED_BANDWIDTH * bandwidth_gbs * 1e9)
    kernels_s = layers * EAGER_KERNELS_S_PER_LAYER
    numbers = f"~{1e3 * traffic_s:.1f} ms of memory traffic, ~{1e3 * kernels_s:.1f} ms of small kernels per step"
    if kernels_s <= COMPILE_ABOVE * traffic_s:
        return GRAPHS, f"eager decode step replayed as a CUDA graph, nothing compiled: memory traffic bounds it ({numbers})"
    if steps is not None and steps * kernels_s < COMPILE_S_ESTIMATE:
        return GRAPHS, (f"eager decode step replayed as a CUDA graph: compiling would not pay back over this "
                        f"run's ~{steps} steps ({numbers})")
    return COMPILED, f"decode step compiled, replayed as a CUDA graph: its small kernels would weigh ({numbers})"


class FastGenerator:
    """``generate`` on the static-cache path for one model on one GPU; reuse it across calls.

    ``prefill``: ``"eager"`` (the default of ``generation_for``), ``"blocks"`` compiles the stateless
    blocks of every layer (seconds), ``"decoder"`` the whole language model per shape (a minute).
    ``decode``: ``"auto"`` (``decode_plan`` per batch shape), ``"compiled"`` (the forward compiled
    without CUDA graphs, then captured as one), ``"graphs"`` (the eager forward captured as a CUDA
    graph) or ``"eager"`` (launched from Python every step).
    A compiled decoder prefill is put on the language model only for the length of a call, so that
    an eager ``generate`` of the same model (profiling, say) never runs it."""

    def __init__(self, model, on_compile=None, prefill: str = "eager", decode: str = "auto"):
        if prefill not in PREFILLS or decode not in DECODES:
            raise ValueError(f"prefill must be one of {PREFILLS} and decode one of {DECODES}, got {prefill!r}, {decode!r}")
        self.model = model
        self.on_compile = on_compile  # called with a message before and after a shape's first call
        self.compile_s: dict[tuple[int, int], float] = {}  # (batch, cache length) -> first call's seconds
        self.decode_choice: dict[tuple[int, int], str] = {}  # (batch, cache length) -> how it decodes, and why
        self.decode_how: dict[tuple[int, int], str] = {}  # (batch, cache length) -> "compiled", "graphs" or "eager"
        self.capture_s: dict[tuple[int, int], float] = {}  # (batch, cache length) -> warm-up and capture seconds
        self.expected_steps: int | None = None  # decode steps the run will take, where the caller knows them
        self.batch_size: int | None = None  # the batch of the last call that succeeded: pad smaller ones to it
        self.blocks: list[str] = []  # the compiled blocks of one layer ("mlp", "input_layernorm" ...)
        self.fallbacks: list[str] = []  # compiles that failed, and what runs instead
        self.frozen = False  # whether the compiled decode step holds the weights as constants (FREEZE_WEIGHTS)
        self.static_cache = True  # False after the static cache itself failed: generate's own cache
        self.decode = decode
        self._cache = None
        self._cache_key = None
        self._step = None  # the GraphedStep bound to self._cache
        self._compiled_forward = None
        self._cache_kw = cache_keyword(type(model).forward)
        # a cache allocated lazily inside a compiled forward would not be a static address, and the
        # decode step would lose its CUDA graph: compile only where the cache can be made first
        self._init_shape = getattr(model, "_get_static_cache_init_shape", lambda: None)()
        self._decoder = self._prefill = None
        self._prefill_mode = prefill if self._init_shape is not None else "eager"
        if self._prefill_mode == "decoder":
            self._compile_prefill()

    def _compile_prefill(self):
        import torch

        try:
            decoder = self.model.get_decoder()
        except (AttributeError, ValueError, NotImplementedError):
            return  # prefill stays eager; decode is still compiled by generate
        self._decoder, self._prefill = decoder, torch.compile(decoder.forward, dynamic=False)

    def close(self):
        """Let go of the cache and the compiled prefill (compiled blocks stay: they cost no memory)."""
        self._decoder = self._prefill = None
        self._cache = self._cache_key = self._step = None
        self.batch_size = None

    def generate(self, inputs: dict, max_new_tokens: int, **kwargs):
        """``model.generate(**inputs, ...)`` with this shape's static cache; returns its output.
        On an error (out of memory, say) the cache is let go before the error propagates."""
        import torch

        from vlmlab.run.compiled_blocks import compile_blocks
        from vlmlab.run.decode_loop import without_sync

        batch, prompt = (int(n) for n in inputs["input_ids"].shape[:2])
        key = (batch, cache_length(prompt, max_new_tokens))
        if self._cache_key is not None and self._cache_key[0] == batch and self._cache_key[1] >= key[1]:
            key = self._cache_key  # a longer cache of this batch serves too: no new shape to compile
        first = key not in self.compile_s
        if first and self.on_compile is not None:
            self.on_compile(f"preparing batch {key[0]}, {key[1]} cache tokens: capturing the decode step "
                            "(compiling it where chosen), once per shape...")
        t0 = time.perf_counter()
        if self._prefill_mode == "blocks" and not self.blocks:
            self.blocks = compile_blocks(self.model)
            if not self.blocks:
                self._prefill_mode = "eager"  # nothing to compile: do not look again
        if self._prefill is not None:
            vars(self._decoder)["forward"] = self._prefill
        try:
            if self.static_cache:
                cache = self._cache_for(key)
                step = self._step_for(key, cache)
                compiles = step is None and self.decode_how[key] == REDUCE_OVERHEAD
                out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, disable_compile=not compiles,
                                          **{self._cache_kw: cache}, **without_sync(self.model, kwargs, step))
            else:
                out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, disable_compile=True,
                                          **without_sync(self.model, kwargs))
        except BaseException as err:
            self._cache = self._cache_key = self._step = None
            if first and self._give_up_a_compile(err):
                return self.generate(inputs, max_new_tokens, **kwargs)
            raise
        finally:
            if self._decoder is not None:
                vars(self._decoder).pop("forward", None)
        self._note_capture(key)
        if first:
            if self.model.device.type == "cuda":
                torch.cuda.synchronize(self.model.device)
            self.compile_s[key] = time.perf_counter() - t0
            if self.on_compile is not None:
                how = self.decode_how.get(key, EAGER)
                self.on_compile(f"batch {key[0]} ready in {self.compile_s[key]:.0f} s (decode: {how})")
        self.batch_size = key[0]
        return out

    def _give_up_a_compile(self, err) -> bool:
        """After a first call failed for another reason than memory: drop the compiled blocks, else
        the compiled decode, note why in ``fallbacks``, and say whether a retry makes sense."""
        from vlmlab.run.compiled_blocks import uncompile
        from vlmlab.run.oom import is_oom

        if not isinstance(err, Exception) or is_oom(err):
            return False
        why = f"{type(err).__name__}: {str(err)[:200]}"
        if self.blocks:
            uncompile(self.model)
            self.blocks, self._prefill_mode = [], "eager"
            self.fallbacks.append(f"compiled blocks failed ({why}); they run eager")
            return True
        if self.decode != "eager":
            self.fallbacks.append(f"the decode step ({self.decode}) failed ({why}); decode steps run eager")
            self.decode, self.decode_choice, self.decode_how, self._step = EAGER, {}, {}, None
            return True
        if self.static_cache:  # e.g. Mllama's cross-attention states do not fit a static cache of prompt length
            self.static_cache = False
            self.fallbacks.append(f"the static cache failed ({why}); generate keeps its own cache")
            return True
        return False

    def _step_for(self, key, cache):
        """The GraphedStep for this shape's cache, or None where decode steps run eager."""
        from vlmlab.run.graphed_step import GraphedStep

        how = self._decode_for(key, cache)
        if how in (EAGER, REDUCE_OVERHEAD):
            return None
        if self._step is None or self._step.cache is not cache:
            forward = self._compiled() if how == COMPILED else self.model.__call__
            if how == COMPILED and self.frozen and "frozen" not in self.decode_choice[key]:
                self.decode_choice[key] += "; weights frozen into it (q+k+v and gate+up as one product each)"
            self._step = GraphedStep(forward, cache, fallback=self._reduce_overhead())
        return self._step

    def _decode_for(self, key, cache) -> str:
        if key not in self.decode_how:
            if self.decode != "auto":
                how, why = self.decode, f"decode: {self.decode} (asked for)"
            elif self.model.device.type != "cuda":
                how, why = EAGER, "decode steps eager: CUDA graphs need a GPU"
            else:
                how, why = decode_plan(*self._step_bytes(cache), self._layers(), self._bandwidth(), self.expected_steps)
            self.decode_how[key], self.decode_choice[key] = how, why
        return self.decode_how[key]

    def _compiled(self):
        import torch
        from torch._inductor import list_mode_options

        from vlmlab.run.freezing import autotunes, frozen

        if self._compiled_forward is None:  # CUDA graphs are the GraphedStep's: inductor only fuses
            options = dict(list_mode_options(COMPILE_MODE))
            if FREEZE_WEIGHTS and not autotunes(options) and self._room_to_freeze():
                options["freezing"] = True
                self.frozen = True
            compiled = torch.compile(self.model.__call__, dynamic=False, options=options)
            self._compiled_forward = frozen(compiled) if self.frozen else compiled
        return self._compiled_forward

    def _room_to_freeze(self) -> bool:
        """Whether free memory on the model's GPU holds a second copy of its decoder weights and a
        quarter more (freezing concatenates most of them)."""
        import torch

        if self.model.device.type != "cuda":
            return False
        free, _ = torch.cuda.mem_get_info(self.model.device)
        return free > 1.25 * self._step_bytes(None)[0]

    def _reduce_overhead(self):
        """transformers' own compiled forward (the one ``generate`` compiles: "reduce-overhead" mode,
        CUDA graphs that survive graph breaks), for steps that cannot be captured whole; the same
        object ``generate`` reuses in later calls. None off a GPU."""
        if self.model.device.type != "cuda":
            return None
        return self.model.get_compiled_call(getattr(self.model.generation_config, "compile_config", None))

    def _note_capture(self, key) -> None:
        step = self._step
        if step is None or key in self.capture_s:
            return
        if step.graph is not None:
            self.capture_s[key] = step.capture_s
        elif step.failed is not None:
            self.capture_s[key] = 0.0
            then = REDUCE_OVERHEAD if self.model.device.type == "cuda" else EAGER
            self.fallbacks.append(f"the decode step of batch {key[0]} was not captured as a CUDA graph "
                                  f"({step.failed}); from the next call on it runs {then}")
            self.decode_how[key], self._step = then, None
            self.decode_choice[key] += f"; not captured, so {then} from the second call on"

    def _step_bytes(self, cache) -> tuple[int, int]:
        model = self.model
        try:
            weights = sum(p.numel() * p.element_size() for p in model.get_decoder().parameters())
        except (AttributeError, ValueError, NotImplementedError):
            weights = sum(p.numel() * p.element_size() for p in model.parameters())
        head = model.get_output_embeddings()
        weights += 0 if head is None else head.weight.numel() * head.weight.element_size()
        kv = sum(t.numel() * t.element_size() for layer in getattr(cache, "layers", [])
                 for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None)
        return weights, kv

    def _layers(self) -> int:
        from vlmlab.run.compiled_blocks import decoder_layers

        layers = decoder_layers(self.model)
        return len(layers) if layers is not None else 1

    def _bandwidth(self) -> float | None:
        from vlmlab.hardware import bandwidth_of

        device = self.model.device
        if device.type != "cuda":
            return None
        import torch

        return bandwidth_of(torch.cuda.get_device_name(device))

    def _cache_for(self, key):
        if self._cache_key == key:
            self._cache.reset()
            return self._cache
        from transformers import StaticCache

        from vlmlab.run.prefill_write import write_prefill_by_slice

        self._cache = self._cache_key = self._step = None  # the old shape's memory goes before the new one is taken
        model = self.model
        cache = StaticCache(config=model.config, max_cache_len=key[1])
        shape = self._init_shape
        if shape is not None:
            # allocated here, outside any compiled region, so torch marks the tensors as static
            # addresses ("skipping cudagraphs due to mutated inputs" otherwise)
            cache.early_initialization(batch_size=key[0], num_heads=shape[0], head_dim=shape[1],
                                       dtype=model.dtype, device=model.device)
        write_prefill_by_slice(cache)  # the prefill's write as a slice copy, not index_copy_
        self._cache, self._cache_key = cache, key
        return cache


def generation_for(loaded_model, requested: str | None = "auto") -> tuple[str, str, FastGenerator | None]:
    """``(mode, reason, generator)`` for a LoadedModel, decided once and kept on it, so that every
    batch of a run (and every later run) reuses the same cache and compiled graphs. The generator
    is None on the eager path."""
    requested = requested or "auto"
    if requested == "auto" and _profiled(loaded_model.model):
        return EAGER, "a Profiler's hooks are on the model: profiled runs time eager generate", None
    kept = loaded_model.__dict__.setdefault("_generation", {})
    if requested not in kept:
        mode, reason = choose_generation(loaded_model.model, loaded_model.devices, requested)
        fast = FastGenerator(loaded_model.model, prefill=DEFAULT_PREFILL, decode=DEFAULT_DECODE) if mode == STATIC else None
        kept[requested] = (mode, reason, fast)
    return kept[requested]


def _profiled(model) -> bool:
    from vlmlab.observe.hooks import active_hooks

    return active_hooks(model) > 0


def forget(loaded_model) -> None:
    """Drop a LoadedModel's generator (on unload): its cache and the compiled prefill wrapper."""
    for _, _, generator in loaded_model.__dict__.pop("_generation", {}).values():
        if generator is not None:
            generator.close()


def follow_run(loaded_model, steps: int, note=None) -> None:
    """Tell the loaded model's fast path about the run ahead: its decode steps (batches times new
    tokens), so that it compiles a decode step only where that pays back, and ``note(text)`` to
    call when a shape's first call starts and ends (a progress bar's postfix, say). Nothing happens
    on the eager path."""
    _, _, generator = generation_for(loaded_model)
    if generator is not None:
        generator.expected_steps = max(int(steps), 1)
        generator.on_compile = note
