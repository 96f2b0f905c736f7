"""D2Prune's dual-Taylor idea, structured (our reading of the abstract; see docs/pruning.md).

Removing channel j of the down (o) projection changes the layer output by W[:, j] a_j. Expand the
loss to second order in that change, with the Fisher approximation of the Hessian, and let the
activation itself be perturbed too (the calibration -> test shift, modelled as noise with the
channel's calibration variance s_j^2). With g_t = dL/da_{j,t} per token t:

    score_j = 1/2 sum_t g_t^2 (a_t^2 + s_j^2)

the expected second-order change under the weight and the activation perturbation together. The
first-order term sum_t g_t a_t is left out: at a trained optimum it vanishes in expectation (the
OBD argument), and with it the criterion measured worse (docs/results.md). The attention-KL weight
update of the paper is not part of this criterion (no weights are updated)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..passes.prune.config import ChannelGroup, StructuredPruneConfig
from ..passes.registry import register


@register("prune", "d2prune")
@dataclass
class D2PruneConfig(StructuredPruneConfig):
    """Dual-Taylor structured pruning; needs ``calibration`` and a graph that returns logits for
    every position. See StructuredPruneConfig for the ratios."""

    NEEDS: ClassVar[str] = "gradients"

    def score(self, group: ChannelGroup) -> torch.Tensor:
        """1/2 sum g^2 (a^2 + Var a): (C,)."""
        s = group.stats
        return 0.5 * (s.grad_sq_act_sq + s.grad_sq * s.var)
