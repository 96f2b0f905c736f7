"""TOVA (Oren et al., 2024, arXiv:2401.06104): the current query's attention, averaged over all
heads, decides: at prefill the last prompt token's, at every decode step the new token's. No
state beyond the scores themselves: each step looks only at the current query."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..passes.kv.scoring import KVConfig, ScoreInputs, attention_probs
from ..passes.registry import register


@register("kv", "tova")
@dataclass
class TOVAConfig(KVConfig):
    """Decode eviction is on by default."""

    decode: bool = True

    SUPPORTS_DECODE: ClassVar[bool] = True
    OBSERVES: ClassVar[str] = "window"

    def score(self, inputs: ScoreInputs) -> tuple[torch.Tensor, None]:
        """Score = attention of the last query, mean over every head: (B, Hkv, T), the same per KV head."""
        n = inputs.query.shape[2]
        probs = attention_probs(inputs, n - 1, n)  # (B, Hkv, G, 1, T)
        b, hkv, _, _, length = probs.shape
        scores = probs.mean(dim=(1, 2, 3))  # (B, T)
        return scores[:, None, :].expand(b, hkv, length), None
