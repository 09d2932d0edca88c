"""`import vlmlab` is fast and lazy: no torch, no transformers, until an API function needs them."""
import json
import subprocess
import sys

import pytest


def run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_is_fast_and_imports_neither_torch_nor_transformers():
    r = run("""
import json, sys, time
t0 = time.perf_counter()
import vlmlab
dt = time.perf_counter() - t0
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "accelerate", "matplotlib",
                                                               "pandas", "IPython", "ipywidgets", "pynvml"))
print(json.dumps({"seconds": dt, "heavy": heavy, "version": vlmlab.__version__}))
""")
    print(f"\nimport vlmlab took {r['seconds'] * 1000:.1f} ms")
    assert r["heavy"] == []
    assert r["seconds"] < 1.0
    assert r["version"]


def test_hardware_api_stays_light():
    r = run("""
import json, sys
import vlmlab
hw = vlmlab.gpus("2x24GiB")
vlmlab.Hardware, vlmlab.Gpu, vlmlab.DeviceMapError, vlmlab.PlanError, vlmlab.Plan
print(json.dumps({"n": len(hw), "torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules}))
""")
    assert r == {"n": 2, "torch": False, "transformers": False}


def test_api_names_stay_functions_after_their_submodules_are_imported():
    # vlmlab.plan is a function and vlmlab/plan/ a folder: importing the sub-package (as the planner
    # does) must not replace the function; spec/bench live in modules of other names
    r = run("""
import json, types
import vlmlab
first = type(vlmlab.spec).__name__
import vlmlab.plan.planner, vlmlab.plan.devicemap, vlmlab.plan.plan, vlmlab.model.spec, vlmlab.measure.bench
from vlmlab.plan import planner
from vlmlab.plan.plan import Plan
from vlmlab.model.spec import ModelSpec
print(json.dumps({"first": first, "spec": callable(vlmlab.spec) and not isinstance(vlmlab.spec, types.ModuleType),
                  "plan": callable(vlmlab.plan) and not isinstance(vlmlab.plan, types.ModuleType),
                  "bench": callable(vlmlab.bench) and not isinstance(vlmlab.bench, types.ModuleType),
                  "plan_is_planner": vlmlab.plan is planner.plan, "Plan": vlmlab.Plan is Plan,
                  "ModelSpec": vlmlab.ModelSpec is ModelSpec}))
""")
    assert r == {"first": "function", "spec": True, "plan": True, "bench": True, "plan_is_planner": True,
                 "Plan": True, "ModelSpec": True}


def test_plan_then_spec_in_one_session():
    import vlmlab

    p = vlmlab.plan("smolvlm-256m", "1x24GiB")
    s = vlmlab.spec("smolvlm-256m")  # failed with "'module' object is not callable" before the fix
    assert s.name == p.model == "smolvlm-256m"


def test_dir_and_unknown_attribute():
    import vlmlab

    names = dir(vlmlab)
    for name in ("gpus", "plan", "spec", "load", "Plan", "ModelSpec", "PlanError", "DEFAULT_MODEL", "__version__"):
        assert name in names
    with pytest.raises(AttributeError, match="module 'vlmlab' has no attribute 'no_such_thing'"):
        vlmlab.no_such_thing  # noqa: B018


def test_old_import_paths_warn_and_still_work():
    r = run("""
import json, warnings
import vlmlab
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import vlmlab.plans, vlmlab.profiling
    from vlmlab.plans import Plan
    from vlmlab.profiling import Profile, Profiler, MemorySampler
kinds = sorted({w.category.__name__ for w in caught})
print(json.dumps({"kinds": kinds, "Plan": Plan is vlmlab.Plan, "Profile": Profile is vlmlab.Profile,
                  "Profiler": Profiler is vlmlab.Profiler, "MemorySampler": MemorySampler is vlmlab.MemorySampler,
                  "catalog": "llava-1.5-7b" in vlmlab.catalog.names(), "plan_callable": callable(vlmlab.plan)}))
""")
    assert r == {"kinds": ["DeprecationWarning"], "Plan": True, "Profile": True, "Profiler": True,
                 "MemorySampler": True, "catalog": True, "plan_callable": True}
