"""ToMe-style token merging (Bolya et al., ICLR 2023, arXiv:2210.09461) for encoders: at each cut,
bipartite soft matching on the keys of the layer before (averaged over heads): tokens alternate
into sets A and B, each A token's most similar B token (cosine) is its edge, and the ``r`` most
similar edges merge their A token into the B token, averaged by token size. The [CLS] token (the
first) is never merged. With ``proportional_attention``, later layers add log(size) to the
attention logits, so a merged token counts as the tokens it stands for; mean pooling inside the
graph is size-weighted either way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..checks import check_bool
from ..passes.registry import register
from ..passes.tokens.select import CutInputs, TokenConfig


@register("tokens", "tome")
@dataclass
class ToMeConfig(TokenConfig):
    """One cut merges at most half of its tokens (one per A token)."""

    layers: tuple[int, ...] = (1, 2, 3, 4, 5)
    keep_ratios: tuple[float, ...] = (0.9, 0.8, 0.7, 0.6, 0.5)
    proportional_attention: bool = True

    CAUSAL: ClassVar[bool] = False
    MERGES: ClassVar[bool] = True

    @property
    def PROPORTIONAL(self) -> bool:  # noqa: N802 (read like the other methods' class flags)
        return self.proportional_attention

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool(self, "proportional_attention")

    def select(self, inputs: CutInputs, kept: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        length = inputs.key.shape[2]
        merges = length - kept
        a_idx = torch.arange(0, length, 2, device=inputs.key.device)  # (A,): [CLS] is A's first
        b_idx = torch.arange(1, length, 2, device=inputs.key.device)  # (B,)
        if merges > a_idx.numel() - 1:
            raise ValueError(f"ToMe merges at most {a_idx.numel() - 1} of {length} tokens at one cut, asked for {merges}; "
                             "spread the reduction over more layers")
        metric = inputs.key.float().mean(dim=(0, 1))  # (S, D): keys averaged over batch and heads
        metric = metric / metric.norm(dim=-1, keepdim=True)
        similarity = metric[a_idx] @ metric[b_idx].t()  # (A, B)
        similarity[0] = float("-inf")  # [CLS] never merges
        best, partner = similarity.max(dim=-1)  # (A,), (A,)
        merged = best.argsort(descending=True)[:merges]  # (r,) A positions
        destination = torch.arange(length, device=inputs.key.device)  # (S,): the token each token ends up in
        destination[a_idx[merged]] = b_idx[partner[merged]]
        positions = torch.arange(length, device=inputs.key.device)  # (S,)
        gone = torch.zeros(length, dtype=torch.bool, device=inputs.key.device).index_fill(0, a_idx[merged], True)
        index = torch.where(gone, length, positions).sort().values[:kept]  # (K,): the tokens left, [CLS] first
        slot = torch.searchsorted(index, destination)  # (S,): output row of every token
        merge = torch.zeros(kept, length, device=inputs.key.device)  # (K, S)
        merge[slot, positions] = inputs.sizes
        sizes = merge.sum(dim=-1)  # (K,)
        return index, merge / sizes[:, None], sizes
