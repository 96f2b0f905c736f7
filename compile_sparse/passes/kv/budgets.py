"""How many tokens each layer's cache keeps of a prompt: the uniform budget and PyramidKV's ramp.

``length`` may be a SymInt (a prompt length Dynamo made symbolic): the budgets are then symbolic
expressions of it, written with ``torch.sym_*`` so that computing them adds no guard on the length
and one compiled graph serves every prompt length.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import torch


def _ite(condition: Any, then: Any, otherwise: Any) -> Any:
    """``then if condition else otherwise`` for plain and symbolic values alike (no guard)."""
    if isinstance(condition, bool):
        return then if condition else otherwise
    return torch.sym_ite(condition, then, otherwise)


def uniform_budget(length: Any, ratio: float) -> Any:
    """max(1, floor(length x (1 - ratio))), with the product taken in exact rationals (kvpress's
    convention: 0.75 of 1024 keeps 256)."""
    keep = Fraction(1 - ratio).limit_denominator(1 << 20)
    return torch.sym_max(1, (length * keep.numerator) // keep.denominator)


def pyramid_budget(layer: int, num_layers: int, length: Any, ratio: float, window: int, beta: int) -> Any:
    """Tokens layer ``layer`` keeps of a ``length``-token prompt under PyramidKV (kvpress's
    PyramidKVPress, from the KVCache-Factory reference code): a linear ramp from max to min whose
    mean over the layers is window + length * (1 - ratio) - window; the uniform budget when the
    prompt is too short for the ramp."""
    if ratio == 0:
        return length
    size = torch.sym_float(length)
    uniform = torch.sym_max(1, round(size * (1 - ratio)))
    top = window + size * (1 - ratio)
    low = (top - window) / beta
    high = (top - window) * 2 - low
    capped = high >= size - window  # the ramp would start above the prompt: start it at the prompt
    high = _ite(capped, size - window, high)
    low = _ite(capped, (top - window) * 2 - high, low)
    fits = torch.sym_min(torch.sym_min(size - high, high - low), low - window) >= 0  # length >= high >= low >= window
    steps = (high - low) / (num_layers - 1) if num_layers > 1 else 0.0
    return _ite(fits, round(high - layer * steps), uniform)
