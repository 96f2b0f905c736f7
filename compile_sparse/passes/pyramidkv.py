"""PyramidKV (Cai et al., 2024, arXiv:2406.02069): SnapKV's scores with per-layer budgets shaped
like a pyramid: lower layers keep more tokens, higher layers fewer, the same total as uniform.
Budgets follow kvpress's PyramidKVPress (from the KVCache-Factory reference code). Prompt only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .kv_evict import ScoreInputs, check_int, kv_method
from .snapkv import SnapKVConfig, snapkv_window_scores


def pyramid_budget(layer: int, num_layers: int, length: int, ratio: float, window: int, beta: int) -> int:
    """Tokens layer ``layer`` keeps of a ``length``-token prompt: a linear ramp from max to min
    whose mean over the layers is window + length * (1 - ratio) - window; falls back to the uniform
    budget when the prompt is too short for the ramp."""
    uniform = max(1, round(length * (1 - ratio)))
    top = window + length * (1 - ratio)
    low = (top - window) / beta
    high = (top - window) * 2 - low
    if high >= length - window:
        high = length - window
        low = (top - window) * 2 - high
    if ratio == 0 or not (length >= high >= low >= window):
        return uniform if ratio else length
    steps = (high - low) / (num_layers - 1) if num_layers > 1 else 0.0
    return round(high - layer * steps)


@dataclass
class PyramidKVConfig(SnapKVConfig):
    """SnapKV's parameters plus ``beta``: the pyramid's steepness (bottom / top budget ratio)."""

    beta: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "beta")

    def budget(self, layer: int, num_layers: int, length: Any) -> int:
        return pyramid_budget(layer, num_layers, length, self.compression_ratio, self.window_size, self.beta)


@kv_method("pyramidkv", PyramidKVConfig)
def pyramidkv_scores(inputs: ScoreInputs, config: PyramidKVConfig) -> tuple[torch.Tensor, None]:
    return snapkv_window_scores(inputs, config), None
