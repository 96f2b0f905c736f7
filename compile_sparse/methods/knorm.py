"""Knorm (Devoto et al., 2024, arXiv:2406.11430): keys with a small L2 norm draw the most
attention, so keep the lowest-norm keys. Prompt only."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..passes.kv.scoring import KVConfig, ScoreInputs
from ..passes.registry import register


@register("kv", "knorm")
@dataclass
class KnormConfig(KVConfig):
    """No parameters beyond the compression ratio."""

    def score(self, inputs: ScoreInputs) -> tuple[torch.Tensor, None]:
        """Score = -||k||: (B, Hkv, T)."""
        return -torch.linalg.vector_norm(inputs.keys.float(), dim=-1), None
