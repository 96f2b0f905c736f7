"""First-order Taylor (Molchanov et al.; Torch-Pruning's TaylorImportance): removing a weight w
changes the calibration loss by about |w x dL/dw|; a neuron or head sums this over every weight
that writes or reads its channels. Gradients come from one backward of the next-token loss per
calibration batch, summed over the batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..passes.prune.config import ChannelGroup, StructuredPruneConfig
from ..passes.registry import register


@register("prune", "taylor")
@dataclass
class TaylorConfig(StructuredPruneConfig):
    """First-order Taylor; needs ``calibration`` and a graph that returns logits for every
    position. See StructuredPruneConfig for the ratios."""

    NEEDS: ClassVar[str] = "gradients"

    def score(self, group: ChannelGroup) -> torch.Tensor:
        """sum of |w x dL/dw| over the consumer column and the producer rows of each channel: (C,)."""
        total = (group.consumer.double() * group.consumer_grad.double()).abs().sum(0)
        for rows, grads in zip(group.producers, group.producer_grads):
            total = total + (rows.double() * grads.double()).abs().sum(1)
        return total
