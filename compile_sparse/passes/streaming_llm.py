"""StreamingLLM (Xiao et al., 2023, arXiv:2309.17453): keep the first ``n_sink`` tokens (attention
sinks) and the most recent ones. Scores are positions; no attention is computed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .kv_evict import KVConfig, ScoreInputs, check_int, kv_method


@dataclass
class StreamingLLMConfig(KVConfig):
    """``n_sink``: leading tokens always kept. Decode eviction is on by default: the window slides."""

    n_sink: int = 4
    decode: bool = True

    SUPPORTS_DECODE: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "n_sink")


@kv_method("streaming_llm", StreamingLLMConfig)
def streaming_llm_scores(inputs: ScoreInputs, config: StreamingLLMConfig) -> tuple[torch.Tensor, None]:
    """Score = position in the cache (the cache is kept in order), sinks above everything."""
    b, hkv, length, _ = inputs.keys.shape
    position = torch.arange(length, device=inputs.keys.device, dtype=torch.float32)  # (T,)
    scores = torch.where(position < config.n_sink, float(length), position)
    return scores.expand(b, hkv, length), None
