"""EViT-style token reorganization (Liang et al., ICLR 2022, arXiv:2202.07800) for encoders: at
each cut the tokens the [CLS] token attends to most in the layer before (averaged over heads) go
on; the others are fused into one token, their average weighted by that attention (``fuse``), or
dropped. The [CLS] token (the first) is always kept, first. The fused token stands for the tokens
it replaces, so mean pooling inside the graph still averages over every input token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..checks import check_bool
from ..passes.registry import register
from ..passes.tokens.select import CutInputs, TokenConfig, attention_rows


@register("tokens", "evit")
@dataclass
class EViTConfig(TokenConfig):
    """``fuse``: fold the inattentive tokens into one token (EViT) instead of dropping them."""

    layers: tuple[int, ...] = (1,)
    keep_ratios: tuple[float, ...] = (0.7,)
    fuse: bool = True

    CAUSAL: ClassVar[bool] = False
    MERGES: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool(self, "fuse")

    def select(self, inputs: CutInputs, kept: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        length = inputs.key.shape[2]
        attention = attention_rows(inputs, 0, 1).mean(dim=(0, 1))[0]  # (S,): [CLS] attention to every token
        fused = self.fuse and 1 < kept < length
        top = kept - 1 if fused else kept
        ranked = attention.clone()
        ranked[0] = float("inf")  # [CLS] first
        order = ranked.argsort(descending=True)  # (S,)
        index = order[:top].sort().values  # (top,), in sequence order: [CLS] first
        merge = torch.zeros(kept, length, device=attention.device)  # (K, S)
        merge[torch.arange(top), index] = 1.0
        sizes = inputs.sizes[index]
        if fused:
            rest = order[top:]  # (S - top,)
            weights = attention[rest] * inputs.sizes[rest]  # (S - top,)
            total = weights.sum()
            weights = torch.where(total > 0, weights / total.clamp_min(1e-30), 1.0 / rest.numel())  # uniform if unseen
            merge[top, rest] = weights
            index = torch.cat([index, rest[:1]])  # the fused token's masks and positions: its most attended member
            sizes = torch.cat([sizes, inputs.sizes[rest].sum()[None]])
        return index, merge, sizes
