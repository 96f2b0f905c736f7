"""Validation helpers for config dataclasses: each raises a ValueError that names the field and
shows the bad value (``recent_window must be an int >= 0, got -1``)."""

from __future__ import annotations

from typing import Any, Iterable


def check_int(config: object, *names: str, minimum: int = 1) -> None:
    """Every field in ``names`` is an int >= ``minimum`` (bools are not ints here)."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_bool(config: object, *names: str) -> None:
    """Every field in ``names`` is True or False."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")


def is_number_in(value: Any, low: float, high: float, *, low_open: bool = False, high_open: bool = True) -> bool:
    """``value`` is an int or float (not a bool) in the interval [low, high), with open / closed ends as asked."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    return above and below


def check_fraction(config: object, *names: str) -> None:
    """Every field in ``names`` is a number in [0, 1) (a fraction removed: 0 removes nothing)."""
    for name in names:
        value = getattr(config, name)
        if not is_number_in(value, 0.0, 1.0):
            raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")


def check_choice(config: object, name: str, choices: Iterable[str]) -> None:
    """The field ``name`` is one of ``choices``."""
    choices = tuple(choices)
    value = getattr(config, name)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def check_odd(config: object, name: str) -> None:
    """The int field ``name`` is odd (a centred pooling width)."""
    value = getattr(config, name)
    check_int(config, name)
    if value % 2 == 0:
        raise ValueError(f"{name} must be odd, got {value!r}")
