"""SnapKV (Li et al., 2024, arXiv:2404.14469): the last ``window_size`` prompt tokens act as an
observation window; each earlier key is scored by the attention the window pays it, averaged and
pooled over neighbouring tokens (``kernel_size``); the window itself is always kept. Prompt only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..checks import check_int, check_odd
from ..passes.kv.scoring import KVConfig, ScoreInputs, pool_scores, protect_recent, window_scores
from ..passes.registry import register


@register("kv", "snapkv")
@dataclass
class SnapKVConfig(KVConfig):
    """``window_size``: observation queries (the last prompt tokens, always kept); ``kernel_size``:
    width of the average pooling (odd)."""

    window_size: int = 64
    kernel_size: int = 5

    OBSERVES: ClassVar[str] = "window"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "window_size")
        check_odd(self, "kernel_size")

    def score(self, inputs: ScoreInputs) -> tuple[torch.Tensor, None]:
        """Pooled window attention with the window protected: (B, Hkv, T)."""
        scores = pool_scores(window_scores(inputs, self.window_size), self.kernel_size, inputs.valid)
        return protect_recent(scores, inputs.positions, min(self.window_size, inputs.query.shape[2])), None
