"""H2O, heavy-hitter oracle (Zhang et al., 2023, arXiv:2306.14048): a key's score is the attention
it has received from every query so far; the heaviest hitters and a window of recent tokens stay.
We average the accumulated attention over the queries that could see each key (as kvpress's
ObservedAttentionPress does), so that early tokens are not favoured just for being seen more
often. Scores persist across decode steps as backend-owned state (sum and count per token)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..checks import check_int
from ..passes.kv.scoring import KVConfig, ScoreInputs, accumulate, protect_recent
from ..passes.registry import register


@register("kv", "h2o")
@dataclass
class H2OConfig(KVConfig):
    """``recent_window``: the newest tokens, always kept (0 keeps none specially). Decode eviction
    is on by default."""

    recent_window: int = 32
    decode: bool = True

    SUPPORTS_DECODE: ClassVar[bool] = True
    STATE_SIZE: ClassVar[int] = 2
    OBSERVES: ClassVar[str] = "all"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "recent_window", minimum=0)

    def score(self, inputs: ScoreInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean attention received: (B, Hkv, T); state (B, Hkv, T, 2) = [attention sum, queries seen by]."""
        state = accumulate(inputs)  # summed attention probabilities
        scores = state[..., 0] / state[..., 1].clamp(min=1)
        return protect_recent(scores, inputs.positions, self.recent_window), state
