"""What ``caption(model=...)`` names — a name, folder, Plan or LoadedModel — resolved to a loaded
model only when a batch needs one: an already loaded copy is reused, otherwise it is loaded."""
from __future__ import annotations

from pathlib import Path

from vlmlab.run.prompts import DEFAULT_PROMPTS, FALLBACK_PROMPT, MAX_NEW_TOKENS, TINY_MAX_NEW_TOKENS, TINY_PROMPT, build_prompt


class ModelTarget:
    """What ``model=`` names, resolved without loading anything until a batch needs it."""

    def __init__(self, model, gpus, dtype):
        from vlmlab.run.loading import LoadedModel
        from vlmlab.plan.plan import Plan

        if isinstance(gpus, str):  # a bad spec is said now, not after the run has started
            from vlmlab.hardware import gpus as get_gpus

            get_gpus(gpus)
        self.gpus, self.dtype = gpus, dtype
        self.lm = None
        self.plan = None
        self.model = model
        if isinstance(model, LoadedModel):
            if model.model is None:
                raise ValueError(f"{model.name} has been unloaded; load it again with vlmlab.load()")
            if dtype is not None and _canonical(dtype) != model.dtype:
                raise ValueError(f"{model.name} is loaded in {model.dtype}, not {dtype}; unload it and load "
                                 f"it in {dtype}, or leave dtype=None")
            self.lm, self.name, self._spec = model, model.name, model.plan._spec()
        elif isinstance(model, Plan):
            model.validate()
            self.plan, self.name, self._spec = model, model.model, model._spec()
        else:
            from vlmlab.model.spec import spec

            self._spec = spec(model)
            self.name = self._spec.name

    @property
    def replicas(self) -> bool:
        return self.plan is not None and self.plan.runs_in_workers

    @property
    def is_tiny(self) -> bool:
        from vlmlab.model.spec import DEFAULT_MODEL

        if self.name == DEFAULT_MODEL:
            return True
        path = getattr(self._spec, "path", None)
        try:
            return bool(path) and "vlmlab tiny-captioner" in Path(path, "README.md").read_text()[:2000]
        except OSError:
            return False

    def default_prompt(self) -> str:
        return TINY_PROMPT if self.is_tiny else DEFAULT_PROMPTS.get(self._spec.family.name, FALLBACK_PROMPT)

    def default_max_new_tokens(self) -> int:
        return TINY_MAX_NEW_TOKENS if self.is_tiny else MAX_NEW_TOKENS

    def check_context(self, prompt: str, max_new_tokens: int) -> None:
        """Refuse a prompt plus new tokens that cannot fit the language model's context window."""
        config = self._spec.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        context = getattr(text_config, "max_position_embeddings", None)
        if not isinstance(context, int) or context < 1:
            return
        image_tokens = self._spec.dims.image_tokens
        prompt_tokens = self._count_prompt_tokens(prompt)
        need = image_tokens + prompt_tokens + max_new_tokens
        if need > context:
            raise ValueError(
                f"{self.name} reads at most {context} tokens, but {image_tokens} image tokens + {prompt_tokens} "
                f"prompt tokens + max_new_tokens={max_new_tokens} make {need}. Use a shorter prompt or at most "
                f"max_new_tokens={max(context - image_tokens - prompt_tokens, 0)}.")

    def _count_prompt_tokens(self, prompt: str) -> int:
        """The prompt's tokens by the model's tokenizer where it is at hand (loaded, or a local folder);
        otherwise its words, which no tokenizer makes fewer of."""
        tokenizer = None
        if self.lm is not None and self.lm.processor is not None:
            tokenizer = getattr(self.lm.processor, "tokenizer", self.lm.processor)
        elif getattr(self._spec, "path", None):
            tokenizer = _local_tokenizer(self._spec.path)
        if tokenizer is None:
            return len(prompt.split())
        return len(tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"])

    def prompt_text(self, prompt) -> str | None:
        if self.lm is None or self.lm.processor is None:
            return None
        return build_prompt(self.lm.processor, prompt)

    def get(self):
        """The LoadedModel: reuse a loaded copy, or load one now."""
        if self.lm is None:
            found = self._find()
            if found is not None and found.processor is None:
                raise ValueError(random_copy_message(found))
            self.lm = found or self._load()
        return self.lm

    def _find(self):
        from vlmlab.run.loading import _path_of, _same_model, loaded

        path = _path_of(self._spec.path or self.name)
        for m in reversed(loaded()):
            if m.model is None or not _same_model(m, self.name, path):
                continue
            if self.plan is not None:
                if m.dtype == self.plan.dtype and dict(m.device_map) == dict(self.plan.replicas[0].device_map):
                    return m
                continue
            if self.dtype is not None and m.dtype != _canonical(self.dtype):
                continue
            if self.gpus is not None and not set(self._wanted_devices()) <= set(m.devices):
                continue
            return m
        return None

    def _wanted_devices(self) -> list:
        """The devices ``gpus`` asks for: indices, ["cpu"] for a CPU spec; a virtual GPU box matches nothing."""
        if isinstance(self.gpus, (list, tuple)):
            return list(self.gpus)
        from vlmlab.hardware import gpus as get_gpus

        hw = get_gpus(self.gpus)
        if hw.is_cpu:
            return ["cpu"]
        return [g.device for g in hw] if hw.source != "virtual" else [object()]

    def _load(self):
        from vlmlab.run.loading import load

        if self.plan is not None:
            return load(self.plan)
        return load(self.model, gpus=self.gpus, dtype=self.dtype)


def random_copy_message(lm) -> str:
    return (f"{lm.name} is loaded with random weights (vlmlab.load(..., random_weights=True)) and no processor, "
            f"so it cannot caption images, and a second copy on the same devices would double the memory. "
            f"Free it first with vlmlab.unload({lm.name!r}), then caption again: that loads the real weights.")


_TOKENIZERS: dict = {}


def _local_tokenizer(path):
    if path not in _TOKENIZERS:
        try:
            from transformers import AutoTokenizer

            _TOKENIZERS[path] = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        except Exception:  # noqa: BLE001 - no tokenizer there: count words instead
            _TOKENIZERS[path] = None
    return _TOKENIZERS[path]


def _canonical(dtype):
    from vlmlab.model.memory import canonical_dtype

    return canonical_dtype(dtype)
