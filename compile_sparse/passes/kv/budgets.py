"""How many tokens each layer's cache keeps of a prompt: the uniform budget and PyramidKV's ramp.
``length`` may be a SymInt (a prompt length Dynamo made symbolic)."""

from __future__ import annotations

from fractions import Fraction
from typing import Any


def uniform_budget(length: Any, ratio: float) -> Any:
    """max(1, floor(length x (1 - ratio))), with the product taken in exact rationals (kvpress's
    convention: 0.75 of 1024 keeps 256)."""
    keep = Fraction(1 - ratio).limit_denominator(1 << 20)
    return max(1, (length * keep.numerator) // keep.denominator)


def pyramid_budget(layer: int, num_layers: int, length: int, ratio: float, window: int, beta: int) -> int:
    """Tokens layer ``layer`` keeps of a ``length``-token prompt under PyramidKV (kvpress's
    PyramidKVPress, from the KVCache-Factory reference code): a linear ramp from max to min whose
    mean over the layers is window + length * (1 - ratio) - window; the uniform budget when the
    prompt is too short for the ramp."""
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
