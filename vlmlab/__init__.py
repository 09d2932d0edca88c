"""vlmlab: a Jupyter lab bench for vision-language models on one or many GPUs.

The Python API (``vlmlab.api``) is the product; ``%vlm`` magics, widgets and the CLI
(``vlmlab.ui``) are thin skins over it. The layers, lowest first, each a folder::

    hardware.py, assets/   devices; the bundled model, samples, scene generator
    model/                 what a model is (spec, catalogue, memory model, dummy inputs)
    plan/                  planner, Plan, device-map check, plan picture
    observe/               memory sampler, profiler hooks, Profile
    run/                   loading, images, journal, captioning, worker replicas
    measure/               bench, profile runs, plots that compare runs
    api.py, ui/            the API; magics, CLI, widgets

``import vlmlab`` imports neither torch nor transformers: the API is imported on first use.
"""
from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

_API = ["AlreadyLoadedError", "BenchResult", "CaptionResult", "DEFAULT_MODEL", "DeviceMapError", "Gpu", "Hardware",
        "LoadedModel", "MemorySampler", "ModelSpec", "Plan", "PlanError", "Profile", "Profiler", "bench", "caption",
        "catalog", "gpus", "load", "loaded", "plan", "profile", "spec", "unload"]
_UI = {"dashboard": ("vlmlab.ui.widgets", "dashboard")}

__all__ = sorted(_API + list(_UI)) + ["__version__"]


def __getattr__(name):
    if name in _API:
        value = getattr(importlib.import_module("vlmlab.api"), name)
    elif name in _UI:
        module, attr = _UI[name]
        value = getattr(importlib.import_module(module), attr)
    else:
        raise AttributeError(f"module 'vlmlab' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return __all__


class _Package(types.ModuleType):
    """The folder ``vlmlab/plan/`` shares its name with the function ``vlmlab.plan``. Importing
    the sub-package would bind it over the function; keep the function (``from vlmlab.plan import
    planner`` and ``import vlmlab.plan.planner`` still work through ``sys.modules``)."""

    def __setattr__(self, name, value):
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def load_ipython_extension(ipython):
    from vlmlab.ui.magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython):
    from vlmlab.ui.magics import unload_ipython_extension as unload

    unload(ipython)
