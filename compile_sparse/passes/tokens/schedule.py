"""Token-reduction schedules: where the graph is cut and how many tokens each cut keeps."""

from __future__ import annotations

from typing import Any

from ...checks import is_number_in


def check_schedule(layers: tuple[int, ...], keep_ratios: tuple[float, ...]) -> None:
    """Cut layers strictly increasing, >= 1; keep ratios in (0, 1], non-increasing; one per cut."""
    if not layers or len(layers) != len(keep_ratios):
        raise ValueError(f"layers and keep_ratios must be non-empty and of one length, got {list(layers)} "
                         f"and {list(keep_ratios)}")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
            raise ValueError(f"layers must be ints >= 1 (layer 0 has no attention before it to score with), "
                             f"got {layer!r}")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"layers must be strictly increasing, got {list(layers)}")
    for ratio in keep_ratios:
        if not is_number_in(ratio, 0.0, 1.0, low_open=True, high_open=False):
            raise ValueError(f"keep_ratios must be numbers in (0, 1], got {ratio!r}")
    if any(b > a for a, b in zip(keep_ratios, keep_ratios[1:])):
        raise ValueError(f"keep_ratios must not increase, got {list(keep_ratios)}")


def kept_after(keep_ratio: float, length: int) -> int:
    """Tokens left after a cut of a ``length``-token input: max(1, round(length * keep_ratio))."""
    return max(1, round(length * keep_ratio))


def per_layer(layers: tuple[int, ...] | list[int], values: list, first: Any, num_layers: int) -> list:
    """A schedule's value for every layer: ``first`` before the first cut, then each cut's value
    from its layer on (tokens per layer from kept counts, or the kept fraction from keep ratios)."""
    out = [first] * num_layers
    for layer, value in zip(layers, values):
        out[layer:] = [value] * (num_layers - layer)
    return out
