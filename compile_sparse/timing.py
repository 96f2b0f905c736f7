"""Timing helpers for the benchmarks and ``compile-sparse bench`` (EVAL.md "Speed"): medians after
a warm-up, and plain caches to time a decode step over."""

from __future__ import annotations

import statistics
import time

import torch


def median_ms(fn, runs: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in ms over ``runs`` calls, after ``warmup`` calls (compilation)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def map_cache(cache, fn):
    """A new plain DynamicCache whose layers hold ``fn(keys)`` and ``fn(values)`` of ``cache``'s."""
    from transformers import DynamicCache

    copy = DynamicCache()
    for i, layer in enumerate(cache.layers):
        copy.update(fn(layer.keys), fn(layer.values), i)
    return copy


def repeat_cache(cache, batch: int):
    """``cache`` repeated ``batch`` times along the batch axis: (batch, Hkv, L, D) per layer."""
    return map_cache(cache, lambda t: t.repeat(batch, 1, 1, 1))


def slice_cache(cache, start: int):
    """A plain cache holding tokens [start:] of ``cache`` (the ideal: a dense cache of that length)."""
    return map_cache(cache, lambda t: t[:, :, start:].clone())


def decode_step_ms(forward, cache, batch: int, position: int, runs: int) -> float:
    """Median time of one decode step (one new token per sequence at ``position``) over ``cache``."""
    token = torch.zeros((batch, 1), dtype=torch.long)
    position = torch.full((batch, 1), position)

    def step():
        forward(input_ids=token, past_key_values=cache, position_ids=position, use_cache=True)

    return median_ms(step, runs)


def cache_bytes(cache) -> int:
    """Bytes of K and V a DynamicCache holds, over all layers."""
    return sum(2 * layer.keys.numel() * layer.keys.element_size() for layer in cache.layers)


def prefill_and_decode(forward, ids: torch.Tensor, runs: int) -> dict:
    """Median ms of a prefill of ``ids`` (B, T) through ``forward`` (last position's logits only),
    the cache it leaves (its bytes and tokens per layer, measured before decoding), and the median
    ms of one decode step over that cache at position T (the cache grows by the warm-up and timed
    steps unless the method keeps its size)."""
    prefill_ms = median_ms(lambda: forward(input_ids=ids, use_cache=True, logits_to_keep=1), runs)
    cache = forward(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
    kv_bytes, cache_tokens = cache_bytes(cache), [layer.keys.shape[2] for layer in cache.layers]
    decode_ms = decode_step_ms(forward, cache, ids.shape[0], ids.shape[1], runs)
    return {"prefill_ms": prefill_ms, "decode_ms": decode_ms, "kv_bytes": kv_bytes, "cache_tokens": cache_tokens,
            "cache": cache}
