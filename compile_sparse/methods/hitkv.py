"""HitKV (Zhao et al., AAAI 2026): a token's importance is its hit rate, how often it lands in the
top-k of a later query's attention row. Our reading of the abstract, where it leaves things open:
- hits are counted per query head over every query that can see the key (all prompt queries at
  prefill, every new query in decode), summed over the query heads of a KV group, and divided by
  the number of (query, head) pairs that could have hit it: the hit *rate*, so early tokens are
  not favoured for having been seen more often;
- k is ``top_k`` per row (at most the keys a query sees), and the newest ``recent_window`` tokens,
  which few queries have seen yet, are always kept;
- "layer-aware" under uniform memory: the hit rate adapts per layer by itself (a layer whose rows
  are concentrated spends its hits on few tokens); ``budgets="pyramid"`` plugs the counts into a
  layer-specific allocation (PyramidKV's), as the abstract says it can be.
Counts persist across decode steps as backend-owned state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..checks import check_choice, check_int
from ..passes.kv.budgets import pyramid_budget
from ..passes.kv.scoring import KVConfig, ScoreInputs, accumulate, protect_recent
from ..passes.registry import register

BUDGETS = ("uniform", "pyramid")


def top_k_hits(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """probs (B, Hkv, G, c, T) -> hits per key (B, Hkv, T): rows' top-k entries, summed over the
    group and the queries. Masked keys (probability 0) never count."""
    k = min(top_k, probs.shape[-1])
    top = probs.topk(k, dim=-1)
    hit = (top.values > 0).to(probs.dtype)  # (B, Hkv, G, c, k)
    hits = torch.zeros_like(probs).scatter_(-1, top.indices, hit)  # (B, Hkv, G, c, T)
    return hits.sum(dim=(2, 3))


@register("kv", "hitkv")
@dataclass
class HitKVConfig(KVConfig):
    """``top_k``: keys per attention row that score a hit; ``recent_window``: newest tokens always
    kept; ``budgets``: "uniform" (every layer the same) or "pyramid" (PyramidKV's per-layer ramp,
    ``beta`` its steepness). Decode eviction is on by default."""

    top_k: int = 4
    recent_window: int = 32
    budgets: str = "uniform"
    beta: int = 20
    decode: bool = True

    SUPPORTS_DECODE: ClassVar[bool] = True
    STATE_SIZE: ClassVar[int] = 2
    OBSERVES: ClassVar[str] = "all"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "top_k", "beta")
        check_int(self, "recent_window", minimum=0)
        check_choice(self, "budgets", BUDGETS)

    def budget(self, layer: int, num_layers: int, length: Any) -> Any:
        if self.budgets == "uniform":
            return super().budget(layer, num_layers, length)
        return pyramid_budget(layer, num_layers, length, self.compression_ratio, self.recent_window, self.beta)

    def per_query(self, probs: torch.Tensor) -> torch.Tensor:
        return top_k_hits(probs, self.top_k)

    def native_per_query(self) -> int:
        return self.top_k

    def score(self, inputs: ScoreInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Hit rate: (B, Hkv, T); state (B, Hkv, T, 2) = [hits, (query, head) pairs that saw the key]."""
        state = accumulate(inputs, self.per_query)
        scores = state[..., 0] / state[..., 1].clamp(min=1)
        return protect_recent(scores, inputs.positions, self.recent_window), state
