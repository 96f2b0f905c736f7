"""The base of the KV-cache eviction methods and the helpers their scorers share (run side: this
code runs inside the compiled graph).

A method is a ``KVConfig`` subclass registered with ``@register("kv", name)`` that writes
``score(inputs)``: one score per cached token and KV head (higher is kept) and, for methods whose
scores persist across decode steps, the new state. ``compile_sparse.passes.kv.evict`` keeps the
top ``budget`` tokens per sequence and KV head; ``rewrite`` puts that into the graph.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from ...checks import check_bool, check_fraction
from ...codegen import ops
from ...reference import causal_visibility, grouped_probs
from .budgets import uniform_budget

SCORE_CHUNK = 256  # queries per chunk when scoring against all keys: at most (B, H, 256, T) at once


@dataclass
class ScoreInputs:
    """What a scorer sees at one attention site.

    query: (B, H, n, D), the n new tokens' queries after RoPE. keys: (B, Hkv, P + n, D), the past
    cache then the new keys. state: (B, Hkv, P, STATE_SIZE) kept from earlier calls (None on a
    prefill or for stateless methods). kernels: options["kernels"] ("auto": Triton on CUDA,
    "interpret": Triton's interpreter on CPU too).
    """

    query: torch.Tensor
    keys: torch.Tensor
    scale: float
    causal: bool
    past_len: Any
    state: torch.Tensor | None
    kernels: str = "auto"

    @property
    def group_size(self) -> int:
        return self.query.shape[1] // self.keys.shape[1]


@dataclass
class KVConfig(ABC):
    """Common parameters. ``compression_ratio``: the fraction of the prompt's tokens evicted at
    prefill (0.75 keeps 25%). ``decode``: keep the cache at that size while generating (only for
    methods with a decode rule)."""

    compression_ratio: float = 0.0
    decode: bool = False

    SUPPORTS_DECODE: ClassVar[bool] = False  # the method has a rule for evicting while generating
    STATE_SIZE: ClassVar[int] = 0  # floats of state per cached token and KV head (0: stateless)

    def __post_init__(self) -> None:
        check_fraction(self, "compression_ratio")
        check_bool(self, "decode")
        if self.decode and not self.SUPPORTS_DECODE:
            raise ValueError(f"{type(self).__name__} has no decode rule (it scores the prompt only); "
                             f"decode must be False, got {self.decode!r}")

    @abstractmethod
    def score(self, inputs: ScoreInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores (B, Hkv, P + n), higher is kept, and the new state (B, Hkv, P + n, STATE_SIZE) or None."""

    def kept_tokens(self, prefill: bool, layer: int, num_layers: int, length: Any, past_len: Any) -> Any:
        """Tokens a layer keeps of ``length`` cached ones after a call over ``past_len`` of them: the
        prompt's budget on a prefill; in decode the cache stays at its size (at compression_ratio 0
        it keeps everything)."""
        if prefill:
            return self.budget(layer, num_layers, length)
        return past_len if self.compression_ratio > 0 else length

    def budget(self, layer: int, num_layers: int, length: Any) -> Any:
        """Tokens a layer keeps of a ``length``-token prompt: max(1, floor(length * (1 - ratio)))."""
        return uniform_budget(length, self.compression_ratio)


def attention_probs(inputs: ScoreInputs, start: Any, stop: Any) -> torch.Tensor:
    """Softmax attention of new queries [start, stop) over every cached key, in fp32, with the
    causal mask aligned bottom-right (query i of n sees keys up to P + i): (B, Hkv, G, stop - start, P + n).
    Keys no query of the chunk can see are not computed (their probability is 0)."""
    length = inputs.keys.shape[2]
    visible = inputs.past_len + stop if inputs.causal else length
    mask = None
    if inputs.causal:  # queries [start, stop) are positions P + start.. of the first `visible` keys
        mask = causal_visibility(stop, visible, inputs.query.device, first_query=start)
    probs = grouped_probs(inputs.query[:, :, start:stop], inputs.keys[:, :, :visible], inputs.scale, mask)
    return torch.nn.functional.pad(probs, (0, length - visible))  # (B, Hkv, G, c, P + n)


def query_chunks(n: Any) -> list[tuple[int, Any]]:
    """[start, stop) ranges of at most SCORE_CHUNK queries covering n."""
    return [(start, min(start + SCORE_CHUNK, n)) for start in range(0, n, SCORE_CHUNK)]


def observers(inputs: ScoreInputs) -> torch.Tensor:
    """How many of this call's queries see each cached key: (P + n,) in fp32."""
    n, length = inputs.query.shape[2], inputs.keys.shape[2]
    k_pos = torch.arange(length, device=inputs.keys.device, dtype=torch.float32)
    if not inputs.causal:
        return torch.full((length,), float(n), device=inputs.keys.device)
    return (inputs.past_len + n - k_pos).clamp(min=0, max=n)  # key j is seen by queries P + i >= j


def column_sums(inputs: ScoreInputs, start: Any) -> torch.Tensor:
    """Attention each cached key gets from the new queries [start, n), summed over them and over
    the group: (B, Hkv, P + n) fp32. On CUDA (or with options["kernels"] = "interpret") the Triton
    key-score kernel computes it without a queries x keys matrix; on CPU, chunked torch code that
    Inductor compiles."""
    if inputs.query.is_cuda or inputs.kernels == "interpret":
        return ops.attention_key_scores(inputs.query, inputs.keys, inputs.scale, inputs.causal, start,
                                        interpret=inputs.kernels == "interpret")
    return per_key_totals(inputs, start, lambda probs: probs.sum(dim=(2, 3)))


def per_key_totals(inputs: ScoreInputs, start: Any, per_query: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``per_query`` of the attention probabilities of new queries [start, n), chunk by chunk,
    summed: (B, Hkv, P + n) fp32."""
    b, hkv, length, _ = inputs.keys.shape
    total = inputs.keys.new_zeros((b, hkv, length), dtype=torch.float32)
    for first, stop in query_chunks(inputs.query.shape[2] - start):
        total = total + per_query(attention_probs(inputs, start + first, start + stop))
    return total


def accumulate(inputs: ScoreInputs, per_query: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Running (sum, count) per cached token and KV head: the state of H2O and HitKV.

    ``per_query`` maps attention probabilities (B, Hkv, G, c, T) to per-key amounts summed over
    those queries and the group (B, Hkv, T); None sums the probabilities (``column_sums``).
    Returns (B, Hkv, P + n, 2): [sum, queries seen by].
    """
    b, hkv, length, _ = inputs.keys.shape
    total = column_sums(inputs, 0) if per_query is None else per_key_totals(inputs, 0, per_query)
    count = observers(inputs) * inputs.group_size  # (P + n,)
    new = torch.stack([total, count.expand(b, hkv, length)], dim=-1)  # (B, Hkv, P + n, 2)
    if inputs.state is None:
        return new
    past = torch.nn.functional.pad(inputs.state, (0, 0, 0, length - inputs.state.shape[2]))  # (B, Hkv, P + n, 2)
    return past + new


def protect_recent(scores: torch.Tensor, window: int) -> torch.Tensor:
    """Scores (B, Hkv, T) with the last ``window`` tokens raised above every other, newer above
    older: they are kept first, and a budget smaller than the window keeps the newest."""
    if window == 0:
        return scores
    length = scores.shape[-1]
    position = torch.arange(length, device=scores.device, dtype=scores.dtype)  # (T,)
    raised = scores.amax(dim=-1, keepdim=True) + 1 + position / length  # (B, Hkv, T)
    return torch.where(position >= length - window, raised, scores)


def pool_scores(scores: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Average each token's score with its neighbours (SnapKV's clustering): (B, Hkv, T) -> same."""
    if kernel_size == 1:
        return scores
    b, h, t = scores.shape
    pooled = torch.nn.functional.avg_pool1d(scores.reshape(b * h, 1, t), kernel_size, stride=1,
                                            padding=kernel_size // 2, count_include_pad=False)  # (B*Hkv, 1, T)
    return pooled.reshape(b, h, t)


def window_scores(inputs: ScoreInputs, window: int) -> torch.Tensor:
    """Mean attention the last ``window`` new queries pay each key, averaged over the group: (B, Hkv, P + n)."""
    n = inputs.query.shape[2]
    seen = min(window, n)
    return column_sums(inputs, n - seen) / (seen * inputs.group_size)
