"""Structured pruning: ``config`` (the criterion base class), ``allocate`` (removals per layer),
``plan_build`` (calibrate, score, allocate into a Plan) and ``apply`` (the compile-time pass that
slices the weights). Pruning has no run side: the graph just computes with smaller weights."""

from . import apply  # noqa: E402,F401  (registers the family's pass)
