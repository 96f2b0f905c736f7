"""StreamingLLM (Xiao et al., 2023, arXiv:2309.17453): keep the first ``n_sink`` tokens (attention
sinks) and the most recent ones. Scores are positions; no attention is computed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..checks import check_int
from ..passes.kv.scoring import KVConfig, ScoreInputs
from ..passes.registry import register


@register("kv", "streaming_llm")
@dataclass
class StreamingLLMConfig(KVConfig):
    """``n_sink``: leading tokens always kept. Decode eviction is on by default: the window slides."""

    n_sink: int = 4
    decode: bool = True

    SUPPORTS_DECODE: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "n_sink")

    def score(self, inputs: ScoreInputs) -> tuple[torch.Tensor, None]:
        """Score = true position (newer is kept), the first ``n_sink`` positions above everything."""
        positions = inputs.positions
        top = positions.amax(dim=-1, keepdim=True) + 1  # (B, Hkv, 1)
        return torch.where((positions < self.n_sink) & (positions >= 0), top, positions), None
