"""Apply a saved Plan (compile_sparse.plan): the pruning a structured criterion chose once, with
no calibration and no scoring. ``options={"prune": {"method": "plan", "plan": "plan.json"}}``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch.fx as fx

from ..analysis import GraphAnalysis
from ..passes.context import PassContext
from ..passes.prune.apply import apply_plan
from ..passes.registry import register, register_pass
from ..plan import Plan
from ..report import PassResult


@register("prune", "plan")
@dataclass
class PlanConfig:
    """``plan``: a Plan, or the path of one saved as JSON (read when the config is made)."""

    plan: Plan | str | Path

    def __post_init__(self):
        if isinstance(self.plan, (str, Path)):
            self.plan = Plan.load(self.plan)
        if not isinstance(self.plan, Plan):
            raise ValueError(f"plan must be a compile_sparse Plan or the path of one, got {type(self.plan).__name__}")


@register_pass(PlanConfig)
def saved_plan_pass(gm: fx.GraphModule, analysis: GraphAnalysis, config: PlanConfig, ctx: PassContext) -> PassResult:
    return apply_plan(gm, analysis, config.plan)
