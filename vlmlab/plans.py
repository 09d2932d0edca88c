"""Deprecated: moved to :mod:`vlmlab.plan.plan` (``vlmlab.Plan`` is the stable name). Removed in 0.3."""
import warnings

from vlmlab.plan.plan import Plan, Replica  # noqa: F401

warnings.warn("vlmlab.plans is deprecated; use vlmlab.Plan (or vlmlab.plan.plan.Plan)", DeprecationWarning, stacklevel=2)
