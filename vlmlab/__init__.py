"""vlmlab: a Jupyter lab bench for vision-language models on one or many GPUs.

The Python API is the product; ``%vlm`` magics, widgets and the CLI are thin skins over it.
``import vlmlab`` imports neither torch nor transformers: each API function imports what it
needs on first use, so loading the extension is fast and never initialises CUDA.
"""
from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> (module, attribute); resolved on first access (PEP 562)
_API = {
    "gpus": ("hardware", "gpus"),
    "Hardware": ("hardware", "Hardware"),
    "Gpu": ("hardware", "Gpu"),
    "spec": ("spec", "spec"),
    "ModelSpec": ("spec", "ModelSpec"),
    "DEFAULT_MODEL": ("spec", "DEFAULT_MODEL"),
    "plan": ("planner", "plan"),
    "Plan": ("plan", "Plan"),
    "PlanError": ("planner", "PlanError"),
    "DeviceMapError": ("devicemap", "DeviceMapError"),
    "load": ("loading", "load"),
    "loaded": ("loading", "loaded"),
    "unload": ("loading", "unload"),
    "LoadedModel": ("loading", "LoadedModel"),
    "AlreadyLoadedError": ("loading", "AlreadyLoadedError"),
    "bench": ("bench", "bench"),
    "profile": ("profile_run", "profile"),
    "Profiler": ("profiling", "Profiler"),
    "Profile": ("profiling", "Profile"),
    "MemorySampler": ("profiling", "MemorySampler"),
    "BenchResult": ("bench", "BenchResult"),
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


class _Package(types.ModuleType):
    """Importing the submodule ``vlmlab.spec`` (or ``vlmlab.plan``) makes Python set it as an
    attribute of the package, which would hide the API function of the same name: after
    ``vlmlab.plan(...)``, ``vlmlab.spec`` was the module. Those submodules stay in sys.modules."""

    def __setattr__(self, name, value):
        if name in _API and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def load_ipython_extension(ipython):
    from .magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython):
    from .magics import unload_ipython_extension as unload

    unload(ipython)
