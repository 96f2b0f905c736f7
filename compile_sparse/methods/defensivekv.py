"""DefensiveKV (Feng et al., 2025; github.com/FFY0/DefensiveKV): the usual eviction score averages a
key's importance over the observation queries, which assumes the queries to come resemble them.
DefensiveKV aggregates defensively instead, in two linear-time steps: the worst case (the maximum
over the observation window's queries and the heads of a KV group), then a floor at the mean over
the keys, so that no key's score depends on one query alone (the keys under the floor are ordered
by their mean over the queries, a term at most a thousandth of the floor). The importance is SnapKV's: window
attention, pooled over neighbouring tokens (each row's mass kept). The window itself is always kept.
Prompt only.

Not included: the CriticalKV value-projection weighting of the authors' code (it reads the output
projection, which a scorer here does not see). AdaKV's per-head budgets, which the authors pair it
with, are every method's ``head_budgets="adaptive"`` (passes/kv/packed.py)."""

from __future__ import annotations

from dataclasses import dataclass
import torch

from ..passes.kv.scoring import ScoreInputs, attention_probs, pool_scores, protect_recent
from ..passes.registry import register
from .snapkv import SnapKVConfig

TIE_BREAK = 1e-3  # keys under the floor tie; the mean aggregate, this small, orders them


@register("kv", "defensivekv")
@dataclass
class DefensiveKVConfig(SnapKVConfig):
    """SnapKV's parameters (``window_size``: observation queries, always kept; ``kernel_size``: the
    pooling width), a smaller window by default, as the authors' code."""

    window_size: int = 32

    def score(self, inputs: ScoreInputs) -> tuple[torch.Tensor, None]:
        """Max over window queries and group heads of the pooled rows, floored at the row mean: (B, Hkv, T)."""
        n = inputs.query.shape[2]
        window = min(self.window_size, n)
        rows = attention_probs(inputs, n - window, n)  # (B, Hkv, G, w, T)
        b, hkv, g, w, length = rows.shape
        flat = rows.reshape(b, hkv * g * w, length)  # (B, Hkv * G * w, T)
        valid = inputs.valid[:, :, None].expand(b, hkv, g * w, length).reshape(b, hkv * g * w, length)
        pooled = pool_scores(flat, self.kernel_size, valid) * valid
        pooled = pooled * (flat.sum(dim=-1, keepdim=True) / pooled.sum(dim=-1, keepdim=True).clamp(min=1e-30))
        per_query = pooled.view(b, hkv, g * w, length)  # (B, Hkv, G * w, T)
        worst = per_query.amax(dim=2)  # (B, Hkv, T)
        real = inputs.valid.float()
        floor = (worst * real).sum(dim=-1, keepdim=True) / real.sum(dim=-1, keepdim=True).clamp(min=1)  # (B, Hkv, 1)
        tie_break = TIE_BREAK * per_query.mean(dim=2) / per_query.mean(dim=2).amax(dim=-1, keepdim=True).clamp(min=1e-30)
        return protect_recent(worst.clamp(min=floor) + floor * tie_break, inputs.positions, window), None
