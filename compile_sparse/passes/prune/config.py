"""The base of the structured pruning criteria (magnitude, wanda, flap, taylor, d2prune): MLP neurons
and attention heads physically removed. A criterion is a ``StructuredPruneConfig`` subclass
registered with ``@register("prune", name)`` that writes ``score(group)``: one score per channel
of a ChannelGroup (higher is kept). The pass (``apply``) calibrates when the criterion reads data,
allocates the removals per layer (``allocate``), builds a Plan (``plan_build``) and slices the graph.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch

from ...calibration import ChannelStats
from ...checks import check_choice, check_fraction

ALLOCATIONS = ("uniform", "standardized", "outlier")
HEAD_UNITS = ("query", "kv_group")


@dataclass
class ChannelGroup:
    """The weights around C prunable channels: ``producers`` write them (rows, each (C, in)),
    ``consumer`` reads them (columns, (out, C)); gradients of the same shapes when calibrated with
    gradients; ``stats`` of the consumer's input activation when calibrated."""

    producers: list[torch.Tensor]
    consumer: torch.Tensor
    producer_grads: list[torch.Tensor | None]
    consumer_grad: torch.Tensor | None
    stats: ChannelStats | None


@dataclass
class StructuredPruneConfig(ABC):
    """``mlp_ratio``: fraction of MLP neurons removed (uniform: every MLP keeps
    round(width x (1 - mlp_ratio))). ``head_ratio``: fraction of query heads removed, in units of
    ``head_unit``: "query" removes round(group x head_ratio) query heads from every KV group,
    "kv_group" removes round(kv_heads x head_ratio) KV groups. ``allocation``: "uniform", or
    adaptive per layer under the same global count: "standardized" (FLAP: scores z-scored per
    layer, the globally lowest removed) or "outlier" (OWL-style layer ratios from the share of
    outlier activations). ``calibration``: token-id batches, each shaped like the compiled input.
    ``save_plan``: write the Plan here as JSON."""

    mlp_ratio: float = 0.0
    head_ratio: float = 0.0
    head_unit: str = "query"
    allocation: str = "uniform"
    calibration: Sequence[torch.Tensor] | None = None
    save_plan: str | None = None

    NEEDS: ClassVar[str] = "weights"  # "weights", "activations" or "gradients"
    BIAS_COMPENSATION: ClassVar[bool] = False

    def __post_init__(self):
        check_fraction(self, "mlp_ratio", "head_ratio")
        check_choice(self, "head_unit", HEAD_UNITS)
        check_choice(self, "allocation", ALLOCATIONS)
        if self.calibration is not None:
            if isinstance(self.calibration, torch.Tensor) or len(self.calibration) == 0:
                raise ValueError("calibration must be a non-empty list of token-id tensors, got "
                                 f"{type(self.calibration).__name__}")
        if self.needs_calibration() and self.calibration is None:
            reasons = ([f"a criterion that reads {self.NEEDS}"] if self.NEEDS != "weights" else []) + \
                      (["outlier allocation"] if self.allocation == "outlier" else [])
            raise ValueError(f"{type(self).__name__} needs calibration batches ({' and '.join(reasons)}); "
                             "pass calibration=[token ids, ...]")

    def needs_calibration(self) -> bool:
        return self.NEEDS != "weights" or self.allocation == "outlier" or self.BIAS_COMPENSATION

    @abstractmethod
    def score(self, group: ChannelGroup) -> torch.Tensor:
        """One score per channel of ``group``, (C,): the lowest are removed."""
