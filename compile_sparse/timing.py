"""Timing helpers for the benchmarks and ``compile-sparse bench``: sides timed in turn, round
after round (a machine's drift then hits every side alike), medians with their spread, ratios of
two sides taken round by round (``paired_ratio``; ``round_ratios`` and ``ratio_summary`` to pool
the rounds of several runs), the cost of a first call (compilation), and plain
caches to time a decode step over."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from .progress import progress
from .state import STATE


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    """First quartile, median and third quartile of ``values``."""
    ordered = sorted(values)
    return ordered[len(ordered) // 4], statistics.median(ordered), ordered[(3 * len(ordered)) // 4]


def _summary(times: list[float]) -> dict:
    """Median, quartiles and spread (interquartile range over the median) of times in ms."""
    q1, median, q3 = _quartiles(times)
    return {"median_ms": median, "q1_ms": q1, "q3_ms": q3, "spread": (q3 - q1) / median, "runs": len(times),
            "rounds_ms": list(times)}


def round_ratios(numerator_ms: list[float], denominator_ms: list[float]) -> list[float]:
    """The ratio of two sides' times in each round (both lists in round order, of one length)."""
    return [a / b for a, b in zip(numerator_ms, denominator_ms, strict=True)]


def ratio_summary(ratios: list[float]) -> dict:
    """Median of per-round ratios and their spread (interquartile range over the median)."""
    q1, median, q3 = _quartiles(ratios)
    return {"ratio": median, "spread": (q3 - q1) / median}


def paired_ratio(times: dict[str, dict], numerator: str, denominator: str) -> dict:
    """The ratio of two sides of ``interleaved``'s result taken in each round, then summarized: its
    median and spread (interquartile range over the median). Both times of a round met the same
    machine, so a drift from round to round (another process, the clock) cancels in the ratio,
    where it widens each side's own median."""
    return ratio_summary(round_ratios(times[numerator]["rounds_ms"], times[denominator]["rounds_ms"]))


def interleaved(sides: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1,
                desc: str = "timed rounds") -> dict[str, dict]:
    """Time every side once per round, the order rotating from round to round, after ``warmup``
    rounds: per side the median ms, quartiles, spread and every round's ms (``rounds_ms``). The
    timed rounds show a progress bar named ``desc``."""
    names = list(sides)
    for _ in range(warmup):
        for name in names:
            sides[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in progress(range(rounds), desc=desc, unit="round"):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            sides[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: _summary(values) for name, values in times.items()}


def median_ms(fn: Callable[[], Any], runs: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in ms over ``runs`` calls, after ``warmup`` calls (compilation)."""
    return interleaved({"fn": fn}, runs, warmup)["fn"]["median_ms"]


def seconds(fn: Callable[[], Any]) -> float:
    """Wall time of one call, in seconds (a first call: compilation included)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@contextmanager
def fresh_inductor_cache() -> Iterator[str]:
    """Inductor's on-disk caches in a new empty folder for the duration (a cold compile)."""
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="inductor_cold_") as folder:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
        try:
            yield folder
        finally:
            if old is None:
                del os.environ["TORCHINDUCTOR_CACHE_DIR"]
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = old


def map_cache(cache, fn):
    """A new plain DynamicCache whose layers hold ``fn(keys)`` and ``fn(values)`` of ``cache``'s, and
    ``fn`` of the state the backend keeps for them, if any."""
    from transformers import DynamicCache

    copy = DynamicCache()
    for i, layer in enumerate(cache.layers):
        copy.update(fn(layer.keys), fn(layer.values), i)
        state = STATE.store.get(layer.keys)
        if state is not None:
            STATE.store.put(copy.layers[i].keys, fn(state))
    return copy


def repeat_cache(cache, batch: int):
    """``cache`` repeated ``batch`` times along the batch axis: (batch, Hkv, L, D) per layer."""
    return map_cache(cache, lambda t: t.repeat(batch, *[1] * (t.dim() - 1)))


def slice_cache(cache, start: int):
    """A plain cache holding tokens [start:] of ``cache`` (the ideal: a dense cache of that length)."""
    return map_cache(cache, lambda t: t[:, :, start:].clone())


def decode_step(forward, cache, batch: int, position: int, keep_length: bool = False) -> Callable[[], Any]:
    """One decode step (one new token per sequence at ``position``) over ``cache``, as a function.
    ``keep_length``: drop the appended token again after the step (a DynamicCache then keeps its
    length from step to step, so a static graph serves every step)."""
    token = torch.zeros((batch, 1), dtype=torch.long)
    positions = torch.full((batch, 1), position)
    lengths = [layer.keys.shape[2] for layer in cache.layers]

    def step() -> Any:
        out = forward(input_ids=token, past_key_values=cache, position_ids=positions, use_cache=True)
        if keep_length:
            for layer, length in zip(cache.layers, lengths):
                layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]
        return out

    return step


def decode_step_ms(forward, cache, batch: int, position: int, runs: int) -> float:
    """Median time of one decode step over ``cache``."""
    return median_ms(decode_step(forward, cache, batch, position), runs)


def cache_bytes(cache) -> int:
    """Bytes of K and V a cache's tensors hold, over all layers (their storage, measured)."""
    return sum(layer.keys.untyped_storage().nbytes() + layer.values.untyped_storage().nbytes()
               for layer in cache.layers)


def prefill(forward, ids: torch.Tensor) -> Callable[[], Any]:
    """A prefill of ``ids`` (B, T) through ``forward`` (the last position's logits only), as a function."""
    return lambda: forward(input_ids=ids, use_cache=True, logits_to_keep=1)
