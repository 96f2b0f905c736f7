"""TOVA (Oren et al., 2024, arXiv:2401.06104): the current query's attention, averaged over all
heads, decides: at prefill the last prompt token's, at every decode step the new token's. No
state beyond the scores themselves: each step looks only at the current query.

``kernel_size`` > 1 (ours, SnapKV's clustering) averages the scores (the prompt's and each decode
step's) over neighbouring positions, so that the tokens around an attended one stay with it: a
7-digit number the question points at by its first digit keeps its other six (docs/results.md,
retrieval). ``per_head`` (ours) lets each KV head keep what its own query heads attend to (the mean
over its group) instead of what every head of the layer attends to on average.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..checks import check_bool, check_odd
from ..passes.kv.scoring import KVConfig, ScoreInputs, attention_probs, pool_by_position
from ..passes.registry import register


@register("kv", "tova")
@dataclass
class TOVAConfig(KVConfig):
    """Decode eviction is on by default. ``kernel_size``: scores averaged over this many cached
    tokens neighbouring in position (odd; 1, the paper's, pools nothing). ``per_head``: scores per
    KV head, the mean over its query heads (False, the paper's: one mean over every head)."""

    decode: bool = True
    kernel_size: int = 1
    per_head: bool = False

    SUPPORTS_DECODE: ClassVar[bool] = True
    OBSERVES: ClassVar[str] = "window"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_odd(self, "kernel_size")
        check_bool(self, "per_head")
        if self.packed and not self.per_head:
            raise ValueError("head_budgets='adaptive' needs per_head=True: without it every KV head gets the same "
                             "scores, so there is nothing for the heads to share by")

    def score(self, inputs: ScoreInputs) -> tuple[torch.Tensor, None]:
        """Score = attention of the last query, mean over every head (the same per KV head) or over
        each KV head's group (``per_head``): (B, Hkv, T), pooled over ``kernel_size`` neighbouring
        positions."""
        n = inputs.query.shape[2]
        probs = attention_probs(inputs, n - 1, n)  # (B, Hkv, G, 1, T)
        b, hkv, _, _, length = probs.shape
        if self.per_head:
            scores = probs.mean(dim=(2, 3))  # (B, Hkv, T)
        else:
            scores = probs.mean(dim=(1, 2, 3))[:, None, :].expand(b, hkv, length)  # (B, Hkv, T)
        return pool_by_position(scores, inputs.positions, self.kernel_size), None
