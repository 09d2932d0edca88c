"""Deprecated: moved to :mod:`vlmlab.observe` (``vlmlab.Profiler``, ``vlmlab.Profile`` and
``vlmlab.MemorySampler`` are the stable names). Removed in 0.3."""
import warnings

from vlmlab.observe.hooks import active_hooks  # noqa: F401
from vlmlab.observe.profile import Profile  # noqa: F401
from vlmlab.observe.profiler import Profiler, auto_detail  # noqa: F401
from vlmlab.observe.sampler import MemorySampler, device_key, device_label  # noqa: F401

warnings.warn("vlmlab.profiling is deprecated; use vlmlab.Profiler / vlmlab.Profile (vlmlab.observe)",
              DeprecationWarning, stacklevel=2)
