"""KVzip (Kim et al., 2025, arXiv:2505.23416): query-agnostic eviction by context reconstruction.
After the context is prefilled, the model re-reads it over its own cache ("Repeat the previous
context exactly.", then the context again, teacher-forced); a cached token's score is the largest
attention any re-read query, and any query head of its KV group, pays it. What the model needs to
reproduce its context is what later questions about it need.

The re-read is a second forward, so this method compresses only through
``compile_sparse.compress_context`` (its prefill keeps every token; passes/kv/reread.py): it costs
a second prefill of the context over a cache twice its length. ``kernel_size`` > 1 (ours, as
TOVA's) averages the scores over neighbouring positions; ``n_sink``: the first tokens are always
kept (kvpress's KVzipPress). The paper's allocation across layers is not built (one attention mask
serves every layer: docs/kv_eviction.md, "Limits"); ``head_budgets="adaptive"`` shares a layer's
slots among its heads by these scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..checks import check_int, check_odd
from ..passes.kv.scoring import KVConfig, ScoreInputs, pool_by_position, query_chunks
from ..passes.registry import register


@register("kv", "kvzip")
@dataclass
class KVzipConfig(KVConfig):
    """``n_sink``: the first tokens of every row, always kept (0: none); ``kernel_size``: scores
    averaged over this many neighbouring positions (odd; 1, the paper's, pools nothing)."""

    n_sink: int = 4
    kernel_size: int = 1

    OBSERVES: ClassVar[str] = "window"
    REREAD: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "n_sink", minimum=0)
        check_odd(self, "kernel_size")

    def score(self, inputs: ScoreInputs) -> tuple[torch.Tensor, None]:
        """Score = the largest attention the new queries (the re-read's; padding queries pay none)
        pay each token, over the queries and each KV head's group: (B, Hkv, T), pooled over
        ``kernel_size`` positions among the tokens before the new ones (the re-read pools the
        context alone), the first ``n_sink`` positions raised above every other."""
        b, hkv, length, _ = inputs.keys.shape
        best = inputs.keys.new_zeros((b, hkv, length), dtype=torch.float32)
        for start, stop in query_chunks(inputs.query.shape[2]):
            best = torch.maximum(best, inputs.rows(start, stop).amax(dim=(2, 3)))  # (B, Hkv, T)
        earlier = inputs.positions < inputs.query_positions[:, :1, None]  # (B, Hkv, T): not the re-read's own
        scores = pool_by_position(best, inputs.positions.masked_fill(~earlier, -1.0), self.kernel_size)
        sink = (inputs.positions >= 0) & (inputs.positions < self.n_sink)
        return torch.where(sink, scores.amax(dim=-1, keepdim=True) + 1, scores), None
