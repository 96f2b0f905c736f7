"""KeyDiff (Park et al., 2025, arXiv:2504.15364): keys that point away from the layer's average key
direction are the distinctive ones; keep them. A key's score is minus its cosine similarity to the
mean of the unit-normalized keys of its row and head. No attention is computed. Prompt only."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..passes.kv.scoring import KVConfig, ScoreInputs
from ..passes.registry import register


@register("kv", "keydiff")
@dataclass
class KeyDiffConfig(KVConfig):
    """No parameters beyond the compression ratio."""

    def score(self, inputs: ScoreInputs) -> tuple[torch.Tensor, None]:
        """Score = -cos(k, anchor), the anchor the mean unit key over the real tokens: (B, Hkv, T)."""
        units = F.normalize(inputs.keys.float(), dim=-1)  # (B, Hkv, T, D)
        real = inputs.valid[..., None].float()  # (B, Hkv, T, 1)
        anchor = (units * real).sum(dim=2, keepdim=True) / real.sum(dim=2, keepdim=True).clamp(min=1)  # (B, Hkv, 1, D)
        return -F.cosine_similarity(units, anchor, dim=-1), None
