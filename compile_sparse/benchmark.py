"""Speed of a setting against dense, as ``compile-sparse bench`` and ``bench/kv_speed.py`` measure
it: Inductor on every side, the sides timed in turn round after round (``timing.interleaved``),
medians with their spread; ratios between sides taken round by round (``timing.paired_ratio``).

- prefill: the prompt through the dense and the compressed model (last position's logits only);
- decode: one step over the dense cache, over the compressed cache, and over the *ideal*: a plain
  cache as long as the compressed one, through the dense model (what a perfect implementation of
  the method would cost). The dense and ideal caches keep their length from step to step;
- compilation: the seconds a first prefill and a first decode step take beyond a later one.
"""

from __future__ import annotations

from typing import Any

import torch

from ._torch_internals import compile_per_shape
from .timing import (cache_bytes, decode_step, fresh_inductor_cache, interleaved, paired_ratio, prefill, repeat_cache,
                     seconds, slice_cache)


def compiled(model: torch.nn.Module, options: dict) -> tuple[Any, Any]:
    """(dense, sparse): the model's forward through Inductor (static shapes, any number of them) and
    through the backend, as a user compiles it.

    Each side traces a function of its own: Dynamo keeps compiled graphs, recompile counts and the
    sizes it turns symbolic after a recompile per code object, so with both sides on one
    ``model.forward`` the dense side's shapes would make the sparse side's graphs dynamic (its
    decode step compiled for any cache length) and the two would share one recompile limit."""

    def dense_forward(*args: Any, **kwargs: Any) -> Any:
        return model.forward(*args, **kwargs)

    def sparse_forward(*args: Any, **kwargs: Any) -> Any:
        return model.forward(*args, **kwargs)

    return (compile_per_shape(dense_forward, "inductor"),
            torch.compile(sparse_forward, backend="sparse", options=options))


def compile_seconds(model: torch.nn.Module, options: dict, ids: torch.Tensor, side: str) -> dict:
    """Seconds of compilation of one side ("dense" or "sparse") for the prefill of ``ids`` and a
    decode step after it, in a fresh torch.compile state."""
    torch.compiler.reset()
    forward = dict(zip(("dense", "sparse"), compiled(model, options)))[side]
    first = seconds(prefill(forward, ids))
    cache = prefill(forward, ids)().past_key_values
    again = seconds(prefill(forward, ids))
    step = decode_step(forward, cache, ids.shape[0], ids.shape[1], keep_length=side == "dense")
    first_step = seconds(step)
    step()
    return {"prefill": first - again, "decode": first_step - seconds(step)}


def compile_times(model: torch.nn.Module, options: dict, ids: torch.Tensor) -> dict:
    """``compile_seconds`` of each side with Inductor's on-disk caches empty ("cold": a folder of
    its own per side, so neither side reuses what the other compiled), then filled ("warm")."""
    out: dict = {"cold": {}, "warm": {}}
    for side in ("dense", "sparse"):
        with fresh_inductor_cache():
            out["cold"][side] = compile_seconds(model, options, ids, side)
            out["warm"][side] = compile_seconds(model, options, ids, side)
    return out


def prefill_times(dense, sparse, ids: torch.Tensor, rounds: int) -> dict:
    """Median ms of a prefill of ``ids``, dense and sparse, timed in turn; ``speedup`` is dense over
    sparse round by round (its median, and its spread in ``ratio_spread``)."""
    times = interleaved({"dense": prefill(dense, ids), "sparse": prefill(sparse, ids)}, rounds, desc="prefill rounds")
    speedup = paired_ratio(times, "dense", "sparse")
    return {"dense_ms": times["dense"]["median_ms"], "sparse_ms": times["sparse"]["median_ms"],
            "speedup": speedup["ratio"], "ratio_spread": {"speedup": speedup["spread"]},
            "spread": {side: t["spread"] for side, t in times.items()},
            "rounds_ms": {side: t["rounds_ms"] for side, t in times.items()}}


def decode_times(dense, sparse, dense_cache, sparse_cache, position: int, rounds: int, batch: int = 1) -> dict:
    """Median ms of one decode step at ``position`` over the dense, the ideal and the compressed cache
    (each repeated ``batch`` times along the batch axis), timed in turn, and the bytes each holds.
    ``vs_ideal`` (sparse over ideal) and ``speedup`` (dense over sparse) are taken round by round:
    their medians, with their spreads in ``ratio_spread``."""
    kept = max(layer.keys.shape[2] for layer in sparse_cache.layers)
    ideal_cache = slice_cache(dense_cache, dense_cache.layers[0].keys.shape[2] - kept)
    if batch > 1:
        dense_cache, ideal_cache, sparse_cache = (repeat_cache(c, batch) for c in (dense_cache, ideal_cache, sparse_cache))
    held = {"kv_bytes_dense": cache_bytes(dense_cache), "kv_bytes_sparse": cache_bytes(sparse_cache)}  # before any step
    steps = {"dense": decode_step(dense, dense_cache, batch, position, keep_length=True),
             "ideal": decode_step(dense, ideal_cache, batch, position, keep_length=True),
             "sparse": decode_step(sparse, sparse_cache, batch, position)}
    times = interleaved(steps, rounds, warmup=2, desc="decode rounds")
    out = {f"{side}_ms": t["median_ms"] for side, t in times.items()}
    ratios = {"speedup": paired_ratio(times, "dense", "sparse"), "vs_ideal": paired_ratio(times, "sparse", "ideal")}
    return {**out, "batch": batch, "kept": kept, **{name: r["ratio"] for name, r in ratios.items()},
            "ratio_spread": {name: r["spread"] for name, r in ratios.items()},
            "spread": {side: t["spread"] for side, t in times.items()},
            "rounds_ms": {side: t["rounds_ms"] for side, t in times.items()}, **held}
