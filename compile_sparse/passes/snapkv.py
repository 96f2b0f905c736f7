"""SnapKV (Li et al., 2024, arXiv:2404.14469): the last ``window_size`` prompt tokens act as an
observation window; each earlier key is scored by the attention the window pays it, averaged and
pooled over neighbouring tokens (``kernel_size``); the window itself is always kept. Prompt only."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv_evict import KVConfig, ScoreInputs, check_int, kv_method, pool_scores, protect_recent, window_scores


@dataclass
class SnapKVConfig(KVConfig):
    """``window_size``: observation queries (the last prompt tokens, always kept); ``kernel_size``:
    width of the average pooling (odd)."""

    window_size: int = 64
    kernel_size: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "window_size", "kernel_size")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size!r}")


def snapkv_window_scores(inputs: ScoreInputs, config: SnapKVConfig) -> torch.Tensor:
    """Pooled window attention with the window protected: (B, Hkv, T)."""
    scores = pool_scores(window_scores(inputs, config.window_size), config.kernel_size)
    return protect_recent(scores, min(config.window_size, inputs.query.shape[2]))


@kv_method("snapkv", SnapKVConfig)
def snapkv_scores(inputs: ScoreInputs, config: SnapKVConfig) -> tuple[torch.Tensor, None]:
    return snapkv_window_scores(inputs, config), None
