"""LazyLLM-style prefill token pruning (Fu et al., 2024, arXiv:2407.14057): at each cut, prompt
tokens are ranked by the attention the last ``window`` tokens pay them in the layer before
(summed over heads and those queries); the top ones, and the last ``window`` tokens themselves,
go on into the later layers, which compute (and cache) nothing for the others. Prefill only:
LazyLLM's revival of pruned tokens during decoding is not implemented (decode steps run dense
over the shorter caches)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv_evict import check_int, pool_scores, protect_recent
from .token_reduce import CutInputs, TokenScheduleConfig, attention_rows, token_method


@dataclass
class LazyLLMConfig(TokenScheduleConfig):
    """``window``: the last prompt tokens, always kept, whose attention scores the others;
    ``score``: "window" (LazyLLM: the attention those tokens pay) or "accumulated" (every query's
    attention, averaged over the queries that see the token: H2O's score); ``kernel_size``: width of
    the average pooling of the scores over neighbouring tokens (odd; 1: none)."""

    window: int = 64
    score: str = "window"
    kernel_size: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "window", "kernel_size")
        if self.score not in ("window", "accumulated"):
            raise ValueError(f"score must be 'window' or 'accumulated', got {self.score!r}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size!r}")


@token_method("lazyllm", LazyLLMConfig, causal=True)
def lazyllm_select(inputs: CutInputs, config: LazyLLMConfig, kept: int) -> tuple[torch.Tensor, None, torch.Tensor]:
    length = inputs.key.shape[2]
    window = min(config.window, length)
    if config.score == "window":
        scores = attention_rows(inputs, length - window, length).sum(dim=(0, 2))[None]  # (1, H, S)
    else:
        seen_by = torch.arange(length, 0, -1, device=inputs.key.device)  # (S,): queries at or after each key
        scores = attention_rows(inputs, 0, length).sum(dim=(0, 2))[None] / seen_by  # (1, H, S)
    scores = protect_recent(pool_scores(scores, config.kernel_size).sum(dim=1)[0], window)  # (S,): pooled per head
    index = scores.topk(kept).indices.sort().values  # (K,), in sequence order
    return index, None, inputs.sizes[index]
