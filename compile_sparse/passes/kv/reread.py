"""A context's compression by the model re-reading it (run side: the compiled graph calls this), for
methods that score that way (``KVConfig.REREAD``: KVzip). ``compile_sparse.compress_context`` makes
the two calls:

1. the context's prefill: every real token is kept, in order, with its state (``prompt_state``);
2. the re-read (a repeat prompt, then the context again, teacher-forced at the positions after the
   context): ``compile_sparse::kv_reread`` scores the cached tokens by the re-read's attention,
   keeps each row's budget of them and drops the re-read's own tokens. The cache then holds what
   a prefill of the context keeping its budget would hold.

The re-read's tokens may be right-padded (rows of different lengths): a padding query is one that
HF's mask does not let see itself, and it pays no attention.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...reference import mask_allows
from .packed import row_owners
from .prefill import keep_budgets, real_positions
from .scoring import POSITION, ScoreInputs, config_of, new_positions


def prompt_state(new: Tensor, valid: Tensor | None, *, channels: int, packed: bool) -> Tensor:
    """The state (B, Hkv, T, channels) of a prompt kept whole: each token's true position (-1 for
    padding), every other channel 0 (packed: row r's slots owned by head r). new (B, Hkv, T, D);
    valid (B, T) bool, None when every token is real."""
    b, hkv, length, _ = new.shape
    state = new.new_zeros((b, hkv, length, channels), dtype=torch.float32)
    state[..., POSITION] = real_positions(valid, b, length, new.device)[:, None, :]
    return row_owners(state) if packed else state


def query_validity(mask: Tensor, how: str) -> Tensor:
    """The real queries (B or 1, n) of n new tokens after P cache slots: those HF's attention mask
    (B or 1, 1, n, P + n) lets see themselves."""
    allowed = mask_allows(mask, how)[:, 0]  # (B, n, P + n)
    n = allowed.shape[1]
    return allowed[:, :, -n:].diagonal(dim1=-2, dim2=-1)  # (B, n)


@torch.library.custom_op("compile_sparse::kv_reread", mutates_args=())
def kv_reread(q: Tensor, k: Tensor, v: Tensor, state: Tensor, real_queries: Tensor | None, spec: str, scale: float,
              softcap: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """Keep each row's budget of a cache of P slots, scored by a re-read: q (B, Hq, n, D), the
    re-read's queries; k, v (B, Hkv, P + n, D), the cache's slots then the re-read's tokens; state
    (B, Hkv, P, C) of the P slots (a prompt kept whole: ``prompt_state``); real_queries (B, n) bool
    or None (all real). Returns k, v (B, Hkv, K, D) and the state (B, Hkv, K, C), K the budget of P
    (packed when the config is: per-head budgets)."""
    config = config_of(spec)
    b, hkv, past, _ = state.shape
    n = q.shape[2]
    position = state[..., POSITION]  # (B, Hkv, P)
    new = new_positions(state, n)  # (B, n)
    if real_queries is not None:
        new = new.masked_fill(~real_queries, -1.0)
    positions = torch.cat([position, new[:, None, :].expand(b, hkv, n)], dim=-1)  # (B, Hkv, P + n)
    scores, _ = config.score(ScoreInputs(q, k, scale, positions, new, softcap=softcap))
    scores = scores[..., :past]  # (B, Hkv, P): the context's tokens only
    real = (position[:, 0] >= 0).sum(dim=-1).tolist()
    return keep_budgets(config, k[:, :, :past], v[:, :, :past], scores, None, position, real, 0, 1)


@kv_reread.register_fake
def _(q, k, v, state, real_queries, spec, scale, softcap):
    config = config_of(spec)
    b, hkv, past, channels = state.shape
    slots = config.budget(0, 1, past)
    return (k.new_empty((b, hkv, slots, k.shape[-1])), v.new_empty((b, hkv, slots, v.shape[-1])),
            state.new_empty((b, hkv, slots, channels)))
