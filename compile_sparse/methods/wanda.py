"""Wanda, structured (Sun et al.'s |W| x ||X|| aggregated per neuron, as FLAP's "wanda-sp"
baseline): a channel is worth sum_i |W_down[i, j]| x ||X_j||, with ||X_j|| the L2 norm of the
channel's activation over the calibration tokens; a head sums its channels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..passes.prune.config import ChannelGroup, StructuredPruneConfig
from ..passes.registry import register


@register("prune", "wanda")
@dataclass
class WandaConfig(StructuredPruneConfig):
    """Structured Wanda; needs ``calibration``. See StructuredPruneConfig for the ratios."""

    NEEDS: ClassVar[str] = "activations"

    def score(self, group: ChannelGroup) -> torch.Tensor:
        """sum over outputs of |W[:, j]| x ||X_j||: (C,)."""
        return (group.consumer.double().abs() * group.stats.norm).sum(0)
