"""Where a model goes: the planner, the Plan (JSON, HTML, editable), the device-map check and the
plan picture. Note: ``vlmlab.plan`` is the planning *function*; this sub-package is reached as
``from vlmlab.plan import planner`` or ``from vlmlab.plan.plan import Plan``."""
