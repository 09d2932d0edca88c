"""vlmlab: a Jupyter lab bench for vision-language models on one or many GPUs.

The Python API is the product; ``%vlm`` magics, widgets and the CLI are thin skins over it.
``import vlmlab`` imports neither torch nor transformers: each API function imports what it
needs on first use, so loading the extension is fast and never initialises CUDA.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute); resolved on first access (PEP 562)
_API = {
    "gpus": ("hardware", "gpus"),
    "Hardware": ("hardware", "Hardware"),
    "Gpu": ("hardware", "Gpu"),
    "spec": ("modelspec", "spec"),
    "ModelSpec": ("modelspec", "ModelSpec"),
    "DEFAULT_MODEL": ("modelspec", "DEFAULT_MODEL"),
    "plan": ("planner", "plan"),
    "Plan": ("plans", "Plan"),
    "PlanError": ("planner", "PlanError"),
    "DeviceMapError": ("devicemap", "DeviceMapError"),
    "load": ("loading", "load"),
    "loaded": ("loading", "loaded"),
    "unload": ("loading", "unload"),
    "LoadedModel": ("loading", "LoadedModel"),
    "AlreadyLoadedError": ("loading", "AlreadyLoadedError"),
    "bench": ("benchmark", "bench"),
    "profile": ("profile_run", "profile"),
    "Profiler": ("profiling", "Profiler"),
    "Profile": ("profiling", "Profile"),
    "MemorySampler": ("sampler", "MemorySampler"),
    "BenchResult": ("benchmark", "BenchResult"),
    "dashboard": ("widgets", "dashboard"),
    "caption": ("captioning", "caption"),
    "CaptionResult": ("results", "CaptionResult"),
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name):
    if name in _API:
        module, attr = _API[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vlmlab' has no attribute {name!r}")


def __dir__():
    return __all__


def load_ipython_extension(ipython):
    from .magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython):
    from .magics import unload_ipython_extension as unload

    unload(ipython)
