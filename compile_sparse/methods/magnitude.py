"""Magnitude: a neuron or head is worth the L2 norm of its weights (producer rows and consumer
columns together); no data needed. On SmolLM2 this is the row to beat, not a method to use: layer
0's most active neuron has small weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..passes.prune.config import ChannelGroup, StructuredPruneConfig
from ..passes.registry import register


@register("prune", "magnitude")
@dataclass
class MagnitudeConfig(StructuredPruneConfig):
    """Structured pruning by weight norm; see StructuredPruneConfig for the ratios."""

    def score(self, group: ChannelGroup) -> torch.Tensor:
        """sqrt(sum of squares of every weight that writes or reads each channel): (C,)."""
        total = (group.consumer.double() ** 2).sum(0)
        for rows in group.producers:
            total = total + (rows.double() ** 2).sum(1)
        return total.sqrt()
