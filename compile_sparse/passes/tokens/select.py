"""The base of the token-reduction methods and what runs inside the compiled graph at a cut.

A method is a ``TokenConfig`` subclass registered with ``@register("tokens", name)`` that writes
``select(inputs, kept)``: which tokens go on past a cut (and, for merging methods, how the others
fold into them). ``rewrite`` puts one ``select_tokens`` call per cut into the graph and routes every
per-token tensor crossing the cut through ``reduce_tokens``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...reference import causal_visibility, grouped_logits
from ..registry import build
from .schedule import check_schedule, kept_after


@dataclass
class CutInputs:
    """What a selector sees at one cut: the scoring attention of layer ``L - 1``.

    query (B, H, S, D) and key (B, Hkv, S, D) at that attention (after RoPE), S tokens alive before
    the cut; probs (B, H, S, S), the attention probabilities where the graph computes them (the
    matmul-softmax form), else None; mask, the attention mask SDPA was given (bool: True attends;
    float: added to the logits) or None; sizes (S,), how many input tokens each token stands for.
    """

    query: torch.Tensor
    key: torch.Tensor
    probs: torch.Tensor | None
    mask: torch.Tensor | None
    sizes: torch.Tensor
    scale: float
    causal: bool


@dataclass
class TokenConfig(ABC):
    """``layers``: where the graph is cut (layer ``L`` and later see the reduced tokens; the
    attention of layer ``L - 1`` scores them), strictly increasing, >= 1. ``keep_ratios``: the
    fraction of the input's tokens left after each cut, in (0, 1], non-increasing (1.0 keeps
    every token: outputs equal the dense model's)."""

    layers: tuple[int, ...] = (4,)
    keep_ratios: tuple[float, ...] = (0.5,)

    CAUSAL: ClassVar[bool] = True  # for decoders (the last ``window`` tokens always kept); False: encoders ([CLS] kept)
    MERGES: ClassVar[bool] = False  # the selector folds dropped tokens into kept ones
    PROPORTIONAL: ClassVar[bool] = False  # later attention weighs each key by its token size

    def __post_init__(self) -> None:
        if isinstance(self.layers, int) or isinstance(self.keep_ratios, (int, float)):
            raise ValueError(f"layers and keep_ratios must be lists, got layers={self.layers!r}, "
                             f"keep_ratios={self.keep_ratios!r}")
        self.layers, self.keep_ratios = tuple(self.layers), tuple(self.keep_ratios)
        check_schedule(self.layers, self.keep_ratios)

    def kept(self, cut: int, length: int) -> int:
        """Tokens left after cut ``cut`` of a ``length``-token input."""
        return kept_after(self.keep_ratios[cut], length)

    def last_kept(self) -> int:
        """Tokens every cut keeps at the end (decoders) or, for encoders, 1: the first ([CLS])."""
        return 1

    @abstractmethod
    def select(self, inputs: CutInputs, kept: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(index (K,) of the tokens that go on, merge (K, S) or None, sizes (K,))."""


def attention_rows(inputs: CutInputs, start: int, stop: int) -> torch.Tensor:
    """Attention probabilities of query rows [start, stop) over every key, fp32: (B, H, stop - start, S)."""
    if inputs.probs is not None:
        return inputs.probs[:, :, start:stop].float()
    mask = inputs.mask
    if mask is not None and mask.shape[-2] > 1:
        mask = mask[..., start:stop, :]
    logits = grouped_logits(inputs.query[:, :, start:stop], inputs.key, inputs.scale, mask)  # (B, Hkv, G, r, S)
    if inputs.causal:
        length = inputs.key.shape[2]
        visible = causal_visibility(length, length, logits.device, first_query=start)[:stop - start]  # (r, S)
        logits = logits.masked_fill(~visible, float("-inf"))
    return logits.softmax(dim=-1).flatten(1, 2)  # (B, H, r, S)


def select_tokens(query: torch.Tensor, key: torch.Tensor, probs: torch.Tensor | None, mask: torch.Tensor | None,
                  sizes: torch.Tensor | None, *, method: str, params: dict, kept: int, scale: float, causal: bool,
                  key_transposed: bool) -> tuple[torch.Tensor, ...]:
    """One cut: the tokens that go on. query (B, H, S, D); key (B, Hkv, S, D), or (B, H, D, S) when
    ``key_transposed``; probs (B, H, S, S) or None; sizes (S,) or None (every token stands for one).
    Returns index (K,), sizes (K,) and, for merging methods, merge (K, S)."""
    config = build("tokens", method, params)
    key = key.transpose(-1, -2) if key_transposed else key
    if sizes is None:
        sizes = torch.ones(key.shape[2], device=key.device)
    index, merge, new_sizes = config.select(CutInputs(query, key, probs, mask, sizes, scale, causal), kept)
    return (index, new_sizes) + ((merge,) if config.MERGES else ())


def reduce_tokens(tensor: torch.Tensor, index: torch.Tensor, merge: torch.Tensor | None, axes: tuple[int, ...]) -> torch.Tensor:
    """The tokens of ``tensor`` that go on past a cut: along each axis in ``axes`` (S long), the
    rows ``index`` (K,), or with ``merge`` (K, S) the weighted sums of rows. Returns the tensor with
    K on those axes."""
    for axis in axes:
        if merge is None:
            tensor = tensor.index_select(axis, index)
        else:
            moved = tensor.movedim(axis, -1)  # (..., S)
            tensor = torch.matmul(moved, merge.t().to(tensor.dtype)).movedim(-1, axis)  # K on ``axis``
    return tensor


def weight_tokens(tensor: torch.Tensor, sizes: torch.Tensor, axis: int, mean: bool) -> torch.Tensor:
    """``tensor`` (K tokens on ``axis``) weighted by token sizes (K,), so that a sum over the axis
    counts every input token once, and a mean (``mean``) averages over input tokens."""
    weights = sizes * (sizes.shape[0] / sizes.sum()) if mean else sizes
    shape = [1] * tensor.dim()
    shape[axis] = -1
    return tensor * weights.view(shape).to(tensor.dtype)  # weights broadcast along ``axis``


def size_bias(mask: torch.Tensor | None, sizes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An additive SDPA mask with log token sizes (K,) added on the key axis (ToMe's proportional
    attention); ``mask`` (bool: True attends; float: added) is kept."""
    bias = sizes.log().to(dtype).view(1, 1, 1, -1)  # (1, 1, 1, K)
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return torch.zeros((), dtype=dtype, device=bias.device).masked_fill(~mask, float("-inf")) + bias
    return mask + bias


# ---------------------------------------------------------------------------------------------
