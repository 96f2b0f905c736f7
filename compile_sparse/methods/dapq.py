"""DapQ (Tian et al., 2026, arXiv:2603.11564): keys are scored by the attention of *pseudo queries*
that stand for the tokens still to be generated, instead of the prompt's last queries (SnapKV's
observation window). The abstract: "positional information plays a more critical role than semantic
content" in building them. Our reading, where the abstract leaves things open:
- the pseudo queries are the last ``window_size`` prompt queries moved ``window_size`` positions
  ahead: the window's contents at the positions the first generated tokens will take. RoPE makes the
  move a rotation by ``window_size`` times the angle one position adds, read from the graph's tables
  (``rope_angles``, as ExpectedAttention does), so scaled RoPE variants need nothing of their own;
- they come after the prompt, so each sees every prompt token (no causal mask among them); a key's
  score is the attention they pay it, averaged over them and over its KV group's query heads, then
  pooled over ``kernel_size`` neighbouring positions (SnapKV's clustering);
- nothing is protected: the pseudo queries score the prompt's last tokens like any other.
Where the graph has no RoPE (GPT-2's learned positions) the window's queries are used where they are.
Prompt only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..checks import check_int, check_odd
from ..passes.kv.scoring import KVConfig, ScoreInputs, pool_by_position, rope_angles, rotate
from ..passes.registry import register
from ..reference import grouped_probs


@register("kv", "dapq")
@dataclass
class DapQConfig(KVConfig):
    """``window_size``: pseudo queries (made from the last prompt tokens' queries); ``kernel_size``:
    width of the average pooling of the scores (odd; 1 pools nothing)."""

    window_size: int = 32
    kernel_size: int = 5

    OBSERVES: ClassVar[str] = "window"
    READS_ROPE: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "window_size")
        check_odd(self, "kernel_size")

    def score(self, inputs: ScoreInputs) -> tuple[torch.Tensor, None]:
        """Mean attention of the pseudo queries over the KV group, pooled: (B, Hkv, T)."""
        n = inputs.query.shape[2]
        window = min(self.window_size, n)
        pseudo = inputs.query[:, :, n - window:].float()  # (B, H, W, D)
        if inputs.rope is not None:
            _, step = rope_angles(*inputs.rope)  # (B, D)
            ahead = step * window  # (B, D): the angle of ``window`` positions
            pseudo = rotate(pseudo, ahead.cos()[:, None, None], ahead.sin()[:, None, None])
        real = inputs.query_positions[:, n - window:] >= 0  # (B, W): a short row's padding makes no pseudo query
        visible = inputs.valid[:, :, None, :].expand(-1, -1, window, -1)  # (B, Hkv, W, T)
        probs = grouped_probs(pseudo, inputs.keys, inputs.scale, visible, inputs.softcap)  # (B, Hkv, G, W, T)
        weights = real.float() / real.sum(dim=-1, keepdim=True).clamp(min=1)  # (B, W)
        scores = torch.einsum("bhgwt,bw->bht", probs, weights) / inputs.group_size  # (B, Hkv, T)
        return pool_by_position(scores, inputs.positions, self.kernel_size), None
