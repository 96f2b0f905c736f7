"""PyramidKV (Cai et al., 2024, arXiv:2406.02069): SnapKV's scores with per-layer budgets shaped
like a pyramid: lower layers keep more tokens, higher layers fewer, the same total as uniform.
Budgets follow kvpress's PyramidKVPress (from the KVCache-Factory reference code). Prompt only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..checks import check_int
from ..passes.kv.budgets import pyramid_budget
from ..passes.registry import register
from .snapkv import SnapKVConfig


@register("kv", "pyramidkv")
@dataclass
class PyramidKVConfig(SnapKVConfig):
    """SnapKV's parameters plus ``beta``: the pyramid's steepness (bottom / top budget ratio)."""

    beta: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "beta")

    def budget(self, layer: int, num_layers: int, length: Any) -> int:
        return pyramid_budget(layer, num_layers, length, self.compression_ratio, self.window_size, self.beta)
