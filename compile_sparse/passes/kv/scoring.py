"""The base of the KV-cache eviction methods and the helpers their scorers share (run side: this
code runs inside the compiled graph).

A method is a ``KVConfig`` subclass registered with ``@register("kv", name)`` that writes
``score(inputs)``: one score per cached token and KV head (higher is kept) and, for methods whose
scores persist across calls, the new state. Scorers read tokens by their true positions, never by
their index in the cache: after a decode step writes into a freed slot, the cache is not in
position order, and in a left-padded batch the first positions of a row are padding.
"""

from __future__ import annotations

import functools
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from ...checks import check_bool, check_choice, check_fraction, is_number_in
from ...codegen import ops
from ...reference import grouped_probs
from ..registry import build, method_of, params_of
from .budgets import uniform_budget

HEAD_BUDGETS = ("uniform", "adaptive")  # how a layer's slots are shared among its KV heads
POSITION, PRIORITY = 0, 1  # the first two channels of a cache slot's state; the method's own state follows
FIXED_STATE = 2
FREE = -2.0  # the position of a slot no token has taken yet (a StaticCache's room for tokens to come)
SCORE_CHUNK = 256  # queries per chunk when scoring against all keys: at most (B, H, 256, T) at once


@dataclass
class ScoreInputs:
    """What a scorer sees at one attention site.

    query: (B, H, n, D), the n new tokens' queries after RoPE. keys: (B, Hkv, T, D), every token
    the cache holds once this call's tokens are in (a prefill: the prompt, in order; a decode step:
    the cache slots, the new token in the slot it took). positions: (B, Hkv, T) fp32, each token's
    true position in its sequence, -1 for padding or an empty slot. query_positions: (B, n) fp32,
    the new tokens' positions (-1: padding), non-decreasing. state: (B, Hkv, T, STATE_SIZE), the
    method's state of every token (zero for tokens new in this call), None on a prefill. probs:
    (B, Hkv, G, n, T), the new queries' attention when the graph computed it, else None. totals:
    (B, Hkv, T), ``per_query`` summed over every new query when the attention computed it (the
    fused prefill), else None. plain: the positions are 0..T-1 in order with no padding (the
    Triton key-score kernel may be used). kernels: options["kernels"]. softcap: the attention's
    logit cap (Gemma 2), or None. values: (B, Hkv, T, D) on a prefill, else None. rope: on a
    prefill, (cos, sin) (B, n, D) fp32, the tables RoPE rotated each new query with
    (``q * cos + rotate_half(q) * sin``), None when the analysis found no RoPE at the query.
    """

    query: torch.Tensor
    keys: torch.Tensor
    scale: float
    positions: torch.Tensor
    query_positions: torch.Tensor
    state: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    totals: torch.Tensor | None = None
    plain: bool = False
    kernels: str = "auto"
    softcap: float | None = None
    values: torch.Tensor | None = None
    rope: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def group_size(self) -> int:
        return self.query.shape[1] // self.keys.shape[1]

    @property
    def valid(self) -> torch.Tensor:
        """(B, Hkv, T): the real tokens."""
        return self.positions >= 0

    def rows(self, start: Any, stop: Any) -> torch.Tensor:
        """Attention probabilities of the new queries [start, stop) over every token, fp32:
        (B, Hkv, G, stop - start, T). A query sees the real tokens at or before its position;
        padding queries have rows of zeros."""
        if self.probs is not None:
            return self.probs[:, :, :, start:stop]
        q_pos = self.query_positions[:, start:stop]  # (B, c)
        # a padding query (at -1) sees no real token: grouped_probs gives it a row of zeros
        visible = (self.positions[:, :, None, :] <= q_pos[:, None, :, None]) & self.valid[:, :, None, :]  # (B, Hkv, c, T)
        return grouped_probs(self.query[:, :, start:stop], self.keys, self.scale, visible, self.softcap)

    def seen_by(self) -> torch.Tensor:
        """How many real new queries see each token (B, Hkv, T) fp32: those at or after its position
        (padding queries, at -1, come first and are never counted)."""
        b, hkv, length = self.positions.shape
        q_pos = self.query_positions.contiguous()  # (B, n), non-decreasing
        earlier = torch.searchsorted(q_pos, self.positions.reshape(b, hkv * length).contiguous())  # queries before each token
        return (q_pos.shape[1] - earlier).view(b, hkv, length).float() * self.valid


@dataclass
class KVConfig(ABC):
    """Common parameters. ``compression_ratio``: the fraction of the prompt's tokens evicted at
    prefill (0.75 keeps 25%). ``decode``: keep the cache at that size while generating (only for
    methods with a decode rule). ``head_budgets``: ``"uniform"``, every KV head keeps the layer's
    budget; ``"adaptive"``, the layer's heads share its slots by score (AdaKV), each keeping at
    least ``head_floor`` of the budget, in a packed cache of the same bytes (passes/kv/packed.py)."""

    compression_ratio: float = 0.0
    decode: bool = False
    head_budgets: str = "uniform"
    head_floor: float = 0.2

    SUPPORTS_DECODE: ClassVar[bool] = False  # the method has a rule for evicting while generating
    STATE_SIZE: ClassVar[int] = 0  # floats of state per cached token and KV head (0: stateless)
    # What the scores read of the attention: "none" (keys and positions only), "window" (the rows
    # of a few of the last queries) or "all" (every query's row: computed with the attention itself)
    OBSERVES: ClassVar[str] = "none"
    READS_ROPE: ClassVar[bool] = False  # the scores need RoPE's tables (ScoreInputs.rope) where the graph has them
    # The method scores a prompt by the model re-reading it (KVzip): the prefill keeps every token,
    # and compile_sparse.compress_context's re-read call keeps the budget (passes/kv/reread.py)
    REREAD: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_fraction(self, "compression_ratio")
        check_bool(self, "decode")
        check_choice(self, "head_budgets", HEAD_BUDGETS)
        if not is_number_in(self.head_floor, 0.0, 1.0, high_open=False):
            raise ValueError(f"head_floor must be a number in [0, 1], got {self.head_floor!r}")
        if self.decode and not self.SUPPORTS_DECODE:
            raise ValueError(f"{type(self).__name__} has no decode rule (it scores the prompt only); "
                             f"decode must be False, got {self.decode!r}")

    @property
    def packed(self) -> bool:
        """The cache is packed (per-head budgets): each slot's state ends with its owner head."""
        return self.head_budgets == "adaptive"

    @property
    def state_channels(self) -> int:
        """Floats of state per cache slot: position, priority, the method's state, the owner when packed."""
        return FIXED_STATE + self.STATE_SIZE + self.packed

    @abstractmethod
    def score(self, inputs: ScoreInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores (B, Hkv, T), higher is kept, and the new state (B, Hkv, T, STATE_SIZE) or None."""

    def per_query(self, probs: torch.Tensor) -> torch.Tensor:
        """For methods that observe every query: what a chunk of attention rows (B, Hkv, G, c, T)
        adds to each token's total (B, Hkv, T). The attention probabilities themselves by default."""
        return probs.sum(dim=(2, 3))

    def native_per_query(self) -> int | None:
        """``per_query`` as the native CPU attention (codegen/cpu.py) computes it: 0 the sum of the
        probabilities (the default ``per_query``), k > 0 a hit for each row's k largest (HitKV's),
        None when only ``per_query`` can (the torch chunks run then)."""
        return 0 if type(self).per_query is KVConfig.per_query else None

    def budget(self, layer: int, num_layers: int, length: Any) -> Any:
        """Tokens a layer keeps of a ``length``-token prompt: max(1, floor(length * (1 - ratio)))."""
        return uniform_budget(length, self.compression_ratio)


def attention_probs(inputs: ScoreInputs, start: Any, stop: Any) -> torch.Tensor:
    """The new queries [start, stop)'s attention over every token: (B, Hkv, G, stop - start, T) fp32."""
    return inputs.rows(start, stop)


def query_chunks(n: Any) -> list[tuple[int, Any]]:
    """[start, stop) ranges of at most SCORE_CHUNK queries covering n."""
    return [(start, min(start + SCORE_CHUNK, n)) for start in range(0, n, SCORE_CHUNK)]


def column_sums(inputs: ScoreInputs, start: Any) -> torch.Tensor:
    """Attention each token gets from the new queries [start, n), summed over them and over the
    group: (B, Hkv, T) fp32. On CUDA (or with options["kernels"] = "interpret"), for a plain
    prompt, the Triton key-score kernel computes it without a queries x keys matrix."""
    if inputs.plain and inputs.softcap is None and (inputs.query.is_cuda or inputs.kernels == "interpret"):
        return ops.attention_key_scores(inputs.query, inputs.keys, inputs.scale, True, start,
                                        interpret=inputs.kernels == "interpret")
    return per_key_totals(inputs, start, lambda probs: probs.sum(dim=(2, 3)))


def per_key_totals(inputs: ScoreInputs, start: Any, per_query: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``per_query`` of the attention of the new queries [start, n), chunk by chunk, summed: (B, Hkv, T) fp32."""
    b, hkv, length, _ = inputs.keys.shape
    total = inputs.keys.new_zeros((b, hkv, length), dtype=torch.float32)
    for first, stop in query_chunks(inputs.query.shape[2] - start):
        total = total + per_query(inputs.rows(start + first, start + stop))
    return total


def accumulate(inputs: ScoreInputs, per_query: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Running (sum, count) per token and KV head: the state of H2O and HitKV.

    ``per_query`` maps attention rows (B, Hkv, G, c, T) to per-token amounts (B, Hkv, T); None sums
    the probabilities (``column_sums``: the key-score kernel where it runs). The count is the
    (query, head) pairs that could see the token. Returns (B, Hkv, T, 2).
    """
    if inputs.totals is not None:
        total = inputs.totals
    else:
        total = column_sums(inputs, 0) if per_query is None else per_key_totals(inputs, 0, per_query)
    new = torch.stack([total, inputs.seen_by() * inputs.group_size], dim=-1)  # (B, Hkv, T, 2)
    if inputs.state is None:
        return new
    return inputs.state + new


def protect_recent(scores: torch.Tensor, positions: torch.Tensor, window: int) -> torch.Tensor:
    """Scores (B, Hkv, T) with the newest ``window`` tokens (by position) raised above every other,
    newer above older: they are kept first, and a budget smaller than the window keeps the newest."""
    if window == 0:
        return scores
    newest = positions.amax(dim=-1, keepdim=True)  # (B, Hkv, 1)
    raised = scores.amax(dim=-1, keepdim=True) + 1 + positions / (newest + 1)  # (B, Hkv, T)
    return torch.where((positions > newest - window) & (positions >= 0), raised, scores)


def pool_scores(scores: torch.Tensor, kernel_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Average each token's score with its neighbours (SnapKV's clustering): (B, Hkv, T) -> same.
    With ``valid`` (B, Hkv, T) the average is over the real neighbours only (padding is no neighbour)."""
    if kernel_size == 1:
        return scores
    b, h, t = scores.shape

    def pool(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool1d(x.reshape(b * h, 1, t), kernel_size, stride=1, padding=kernel_size // 2,
                                              count_include_pad=False).reshape(b, h, t)  # (B, Hkv, T)

    if valid is None:
        return pool(scores)
    real = valid.to(scores.dtype)
    return pool(scores * real) / pool(real).clamp(min=1e-12)


def pool_by_position(scores: torch.Tensor, positions: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """``pool_scores`` over the cached tokens in position order, whatever their slot order (a
    decode step's cache is not in order): (B, Hkv, T) -> same. Padding and empty slots are no
    neighbours and keep their scores."""
    if kernel_size == 1:
        return scores
    order = positions.argsort(dim=-1)  # (B, Hkv, T): padding (-1) first
    pooled = pool_scores(scores.gather(-1, order), kernel_size, positions.gather(-1, order) >= 0)
    return torch.where(positions >= 0, torch.empty_like(scores).scatter_(-1, order, pooled), scores)


def window_scores(inputs: ScoreInputs, window: int) -> torch.Tensor:
    """Mean attention the last ``window`` new queries pay each token, averaged over the group and
    over the real queries among them: (B, Hkv, T)."""
    n = inputs.query.shape[2]
    first = n - min(window, n)
    real = (inputs.query_positions[:, first:] >= 0).sum(dim=-1).clamp(min=1)  # (B,)
    return column_sums(inputs, first) / (real[:, None, None] * inputs.group_size)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (..., D): (-x[D/2:], x[:D/2]), the pair partner RoPE mixes each dimension with."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rope_angles(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE's angle at a row's newest token and the angle one position adds, per dimension: (B, D)
    each, read from the tables (B, T, D) of the row's tokens (``ScoreInputs.rope``: the last one its
    newest real token, the one before it the position before). RoPE's attention scaling (a factor on
    both tables) cancels; scaled RoPE variants need nothing of their own. A one-token prompt has no
    step: 0."""
    last = torch.atan2(sin[:, -1], cos[:, -1])  # (B, D)
    before = -2 if cos.shape[1] > 1 else -1
    step = torch.atan2(sin[:, -1] * cos[:, before] - cos[:, -1] * sin[:, before],
                       cos[:, -1] * cos[:, before] + sin[:, -1] * sin[:, before])  # (B, D)
    return last, step


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE's rotation of x (..., D) by the angles whose cosines and sines are cos, sin (broadcast to x)."""
    return x * cos + rotate_half(x) * sin


def new_positions(state: torch.Tensor, n: int) -> torch.Tensor:
    """The positions (B, n) of n new tokens after a cache whose slots' state is ``state`` (B, ..., C):
    after the newest real slot of each row."""
    newest = state[..., POSITION].flatten(1).amax(dim=-1)  # (B,)
    return newest[:, None] + 1 + torch.arange(n, device=state.device, dtype=state.dtype)


def spec_of(config: KVConfig) -> str:
    """The method as the graph carries it: its name and parameters, as JSON."""
    return json.dumps({"method": method_of(config)[1], "params": params_of(config)}, sort_keys=True)


@functools.lru_cache(maxsize=None)
def config_of(spec: str) -> KVConfig:
    data = json.loads(spec)
    return build("kv", data["method"], data["params"])
