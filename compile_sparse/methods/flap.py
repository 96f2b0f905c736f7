"""FLAP (An et al., 2024): the fluctuation of an input channel of the down (o) projection over the
calibration data, times the squared norm of its weight column, says how hard the output is to
recover without it: score_j = Var(X_j) x ||W[:, j]||^2. Removed channels are compensated by a
bias, W[:, removed] @ mean(X[removed]), folded into the down (o) projection. FLAP's adaptive
structure is ``allocation="standardized"``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..passes.prune.config import ChannelGroup, StructuredPruneConfig
from ..passes.registry import register


@register("prune", "flap")
@dataclass
class FLAPConfig(StructuredPruneConfig):
    """FLAP; needs ``calibration``. See StructuredPruneConfig for the ratios."""

    NEEDS: ClassVar[str] = "activations"
    BIAS_COMPENSATION: ClassVar[bool] = True

    def score(self, group: ChannelGroup) -> torch.Tensor:
        """Var(X_j) x ||W[:, j]||^2: (C,)."""
        return group.stats.var * (group.consumer.double() ** 2).sum(0)
