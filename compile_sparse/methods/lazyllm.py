"""LazyLLM-style prefill token pruning (Fu et al., 2024, arXiv:2407.14057): at each cut, prompt
tokens are ranked by the attention the last ``window`` tokens pay them in the layer before
(summed over heads and those queries); the top ones, and the last ``window`` tokens themselves,
go on into the later layers, which compute (and cache) nothing for the others. Prefill only:
LazyLLM's revival of pruned tokens during decoding is not implemented (decode steps run dense
over the shorter caches)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_choice, check_int, check_odd
from ..passes.kv.scoring import pool_scores, protect_recent
from ..passes.registry import register
from ..passes.tokens.select import CutInputs, TokenConfig, attention_rows


@register("tokens", "lazyllm")
@dataclass
class LazyLLMConfig(TokenConfig):
    """``window``: the last prompt tokens, always kept, whose attention scores the others;
    ``score``: "window" (LazyLLM: the attention those tokens pay) or "accumulated" (every query's
    attention, averaged over the queries that see the token: H2O's score); ``kernel_size``: width of
    the average pooling of the scores over neighbouring tokens (odd; 1: none)."""

    window: int = 64
    score: str = "window"
    kernel_size: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "window")
        check_choice(self, "score", ("window", "accumulated"))
        check_odd(self, "kernel_size")

    def last_kept(self) -> int:
        return self.window

    def select(self, inputs: CutInputs, kept: int) -> tuple[torch.Tensor, None, torch.Tensor]:
        length = inputs.key.shape[2]
        window = min(self.window, length)
        if self.score == "window":
            scores = attention_rows(inputs, length - window, length).sum(dim=(0, 2))[None]  # (1, H, S)
        else:
            seen_by = torch.arange(length, 0, -1, device=inputs.key.device)  # (S,): queries at or after each key
            scores = attention_rows(inputs, 0, length).sum(dim=(0, 2))[None] / seen_by  # (1, H, S)
        positions = torch.arange(length, device=scores.device, dtype=torch.float32)  # (S,)
        scores = protect_recent(pool_scores(scores, self.kernel_size).sum(dim=1)[0], positions, window)  # (S,)
        index = scores.topk(kept).indices.sort().values  # (K,), in sequence order
        return index, None, inputs.sizes[index]
