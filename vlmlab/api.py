"""The Python API: one obvious function per job, gathered from the layers below.

``vlmlab/__init__`` re-exports these names lazily, so ``import vlmlab`` stays fast and never
imports torch; each function imports what it needs on first use. The magics, the widgets and the
CLI (``vlmlab.ui``) call these and nothing else of the layers.

    gpus      -> vlmlab.hardware           which devices (real, virtual "2x24GiB", "2xcpu")
    spec      -> vlmlab.model.spec         what a model is: roles, sizes, module tree on meta
    plan      -> vlmlab.plan.planner       where it goes and how full each device gets
    load, loaded, unload -> vlmlab.run.loading
    caption   -> vlmlab.run.caption        images in, captions out (in-process or worker replicas)
    profile   -> vlmlab.measure.profile_run  one measured run
    bench     -> vlmlab.measure.bench      strategies and batch sizes side by side
"""
from __future__ import annotations

from vlmlab.hardware import Gpu, Hardware, gpus
from vlmlab.measure.bench import BenchResult, bench
from vlmlab.measure.profile_run import profile
from vlmlab.model import catalog
from vlmlab.model.spec import DEFAULT_MODEL, ModelSpec, spec
from vlmlab.observe.profile import Profile
from vlmlab.observe.profiler import Profiler
from vlmlab.observe.sampler import MemorySampler
from vlmlab.plan.devicemap import DeviceMapError
from vlmlab.plan.plan import Plan
from vlmlab.plan.planner import PlanError, plan
from vlmlab.run.caption import caption
from vlmlab.run.loading import AlreadyLoadedError, LoadedModel, load, loaded, unload
from vlmlab.run.results import CaptionResult

__all__ = ["AlreadyLoadedError", "BenchResult", "CaptionResult", "DEFAULT_MODEL", "DeviceMapError", "Gpu",
           "Hardware", "LoadedModel", "MemorySampler", "ModelSpec", "Plan", "PlanError", "Profile", "Profiler",
           "bench", "caption", "catalog", "gpus", "load", "loaded", "plan", "profile", "spec", "unload"]
