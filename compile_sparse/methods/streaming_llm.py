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
        """Score = position in the cache (the cache is kept in order), sinks above everything."""
        b, hkv, length, _ = inputs.keys.shape
        position = torch.arange(length, device=inputs.keys.device, dtype=torch.float32)  # (T,)
        scores = torch.where(position < self.n_sink, float(length), position)
        return scores.expand(b, hkv, length), None
