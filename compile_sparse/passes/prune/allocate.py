"""How many units (neurons, heads, KV groups) each layer removes: uniform, or the same total spread
by standardized scores (FLAP) or by the share of outlier activations (OWL)."""

from __future__ import annotations

import math

import torch

from .config import ChannelGroup

# Outlier-aware allocation (after OWL): an outlier is a |W| x ||X|| entry above OUTLIER_M times its
# layer's mean; layer keep ratios spread over +-OUTLIER_LAMBDA around the target, more kept where
# there are more outliers.
OUTLIER_M = 5.0
OUTLIER_LAMBDA = 0.08


def head_units(head_scores: torch.Tensor, num_kv: int, unit: str) -> tuple[torch.Tensor, list[list[int]]]:
    """Removal units of one attention block: (scores (U,), the heads each removes). "query": unit
    k removes the k-th weakest query head of every group; "kv_group": one whole group."""
    group = head_scores.numel() // num_kv
    per_group = head_scores.view(num_kv, group)  # (kv, group)
    if unit == "kv_group" or group == 1:  # without GQA every head is its own group
        return per_group.sum(1), [list(range(g * group, (g + 1) * group)) for g in range(num_kv)]
    order = per_group.argsort(dim=1)  # (kv, group), weakest first
    scores = per_group.gather(1, order).sum(0)  # (group,)
    heads = [[g * group + int(order[g, k]) for g in range(num_kv)] for k in range(group)]
    return scores, heads


def uniform_removals(sizes: list[int], ratio: float) -> list[int]:
    """size - round(size x (1 - ratio)) per layer, leaving at least one unit."""
    return [min(size - round(size * (1 - ratio)), size - 1) for size in sizes]


def allocate(scores: list[torch.Tensor], ratio: float, allocation: str, outliers: list[float] | None) -> list[int]:
    """How many units each layer removes: the uniform count everywhere, or the same total spread by
    standardized scores or outlier shares. Every layer keeps at least one unit."""
    sizes = [s.numel() for s in scores]
    uniform = uniform_removals(sizes, ratio)
    total = sum(uniform)
    if allocation == "uniform" or total == 0:
        return uniform
    if allocation == "standardized":
        pooled = []
        for layer, s in enumerate(scores):
            s = s.double()
            z = (s - s.mean()) / s.std().clamp_min(1e-12) if s.numel() > 1 else torch.zeros_like(s)
            pooled += [(float(v), layer) for v in z]
        removed = [0] * len(scores)
        for _, layer in sorted(pooled):
            if sum(removed) == total:
                break
            if removed[layer] < sizes[layer] - 1:
                removed[layer] += 1
        return removed
    d = torch.tensor(outliers, dtype=torch.float64)
    spread = (d - d.min()) / (d.max() - d.min()).clamp_min(1e-12) * (2 * OUTLIER_LAMBDA)
    keep_ratio = spread - spread.mean() + (1 - total / sum(sizes))
    wanted = [max(0.0, min(size - 1.0, size * (1 - float(k)))) for size, k in zip(sizes, keep_ratio)]
    return round_to_total(wanted, sizes, total)


def round_to_total(wanted: list[float], sizes: list[int], total: int) -> list[int]:
    """Integer removals near ``wanted`` that sum to ``total``: floors, then one more for the
    largest remainders (or one less for the smallest), round robin, within [0, size - 1]."""
    removed = [int(math.floor(w)) for w in wanted]
    order = sorted(range(len(sizes)), key=lambda i: wanted[i] - removed[i], reverse=True)
    step = 0
    while sum(removed) < total and any(removed[i] < sizes[i] - 1 for i in order):
        layer = order[step % len(order)]
        removed[layer] += removed[layer] < sizes[layer] - 1
        step += 1
    while sum(removed) > total:
        layer = order[-1 - step % len(order)]
        removed[layer] -= removed[layer] > 0
        step += 1
    return removed


def outlier_share(group: ChannelGroup) -> float:
    """Share of |W| x ||X|| entries of the consumer above OUTLIER_M times their mean."""
    metric = group.consumer.abs() * group.stats.norm.to(group.consumer.dtype)  # (out, C)
    return float((metric > OUTLIER_M * metric.mean()).double().mean())

