"""Per-head budgets in a packed cache (run side: plain torch code the compiled graph runs).

With ``head_budgets="adaptive"`` the KV heads of a layer share its slots by score, as AdaKV (Feng et
al., 2024) shares them: each head keeps its best ``head_floor x budget`` tokens (at least one), and the rest of
the layer's ``Hkv x budget`` slots go to the highest scores of any of its heads. A head may keep
many times another's tokens, so the cache cannot be one tensor of the heads side by side; it is
packed instead. The cache tensor keeps HF's shape (B, Hkv, K, D), but each sequence's Hkv x K slots
are one row, (B, Hkv * K, D): head 0's tokens first, in position order, then head 1's, and so on,
the slots after every kept token empty (a short row of a left-padded batch). The last channel of
each slot's state is its owner, the KV head its token belongs to. The cache holds the sum of the
per-head budgets, Hkv x K per sequence: the bytes of the uniform allocation, shared differently.

Every read of the cache goes through the owners:

- attention (``packed_attention``): each head attends to the slots it owns, over the whole row;
- a decode step (``packed_decode``) writes each head's new token into a slot that head owns: the
  one its method's rule frees, or the first free one (a StaticCache's room for tokens to come);
- several new tokens that HF's cache appended to every row r (``packed_continuation``) belong to
  head r, and a method with a decode rule keeps each head's real slots at their number.

Scorers see each head's own tokens (``head_view``): the row for every head, the slots of other
heads marked empty (position -1), so that any scorer works unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...reference import grouped_probs
from .scoring import FIXED_STATE, FREE, POSITION, PRIORITY, KVConfig, ScoreInputs, config_of, new_positions

OWNER = -1  # the last state channel of a packed cache slot: its KV head, -1 for an empty slot
_TOP = torch.finfo(torch.float32).max


def adaptive_keep(scores: Tensor, real: Tensor, keep: Tensor, floor: float) -> Tensor:
    """AdaKV's allocation: which tokens (B, Hkv, T) bool each head keeps. scores (B, Hkv, T), higher
    kept; real (B, 1 or Hkv, T) bool, the tokens that may be kept; keep (B,) the uniform budget of
    each row. Each head keeps its ``floor(floor x keep)`` best (at least one), then the row's other slots, up to
    ``Hkv x keep`` in all, go to the highest of the remaining scores of any head."""
    b, hkv, t = scores.shape
    ranked = torch.where(real, scores.float().clamp(-_TOP, _TOP), float("-inf"))  # (B, Hkv, T)
    own_rank = ranked.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # (B, Hkv, T): 0 the best
    base = torch.where(keep > 0, (keep.float() * floor).floor().long().clamp(min=1), 0)  # (B,): every head keeps one
    shared = torch.where(own_rank < base[:, None, None], float("inf"), ranked).reshape(b, hkv * t)  # (B, Hkv * T)
    rank = shared.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # (B, Hkv * T)
    return (rank < (keep * hkv)[:, None]).view(b, hkv, t)


def pack_order(kept: Tensor, owner: Tensor, position: Tensor, slots: int) -> tuple[Tensor, Tensor]:
    """Where each of ``slots`` packed slots comes from: kept (B, F) bool, owner (B, F) the head of each
    candidate, position (B, F) its position. Returns (index (B, slots) into F, real (B, slots) bool):
    the kept candidates by owner, then position, then the others (marked not real)."""
    order = position.argsort(dim=-1, stable=True)  # (B, F)
    heads = torch.where(kept, owner, owner.shape[-1] + 1).gather(-1, order)  # not kept: after every head
    order = order.gather(-1, heads.argsort(dim=-1, stable=True))[:, :slots]  # (B, slots)
    return order, kept.gather(-1, order)


def pack(keys: Tensor, values: Tensor, state: Tensor, index: Tensor, real: Tensor,
         heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """Gather the packed slots: keys, values (B, F, D), state (B, F, C) of F candidates, index and real
    (B, heads * K) from ``pack_order`` -> keys, values (B, heads, K, D) and state (B, heads, K, C), the
    slots not real marked empty (position -1, owner -1)."""
    b, slots = index.shape

    def gather(x: Tensor) -> Tensor:
        return x.gather(1, index[..., None].expand(b, slots, x.shape[-1])).view(b, heads, slots // heads, x.shape[-1])

    state = gather(state)
    empty = ~real.view(b, heads, slots // heads, 1)
    state = torch.cat([state[..., :1].masked_fill(empty, -1.0), state[..., 1:-1], state[..., -1:].masked_fill(empty, -1.0)],
                      dim=-1)
    return gather(keys), gather(values), state


def packed_prefill(k: Tensor, v: Tensor, scores: Tensor, method_state: Tensor | None, positions: Tensor, keep: Tensor,
                   slots: int, floor: float) -> tuple[Tensor, Tensor, Tensor]:
    """A prompt's kept tokens, packed: k, v (B, Hkv, T, D); scores (B, Hkv, T); method_state (B, Hkv, T, S)
    or None; positions (B, T) (-1: padding); keep (B,) each row's uniform budget, ``slots`` the
    full length's. Returns k, v (B, Hkv, slots, D) and the state (B, Hkv, slots, 2 + S + 1)."""
    b, hkv, t, d = k.shape
    kept = adaptive_keep(scores, positions[:, None, :] >= 0, keep, floor)
    owner = torch.arange(hkv, device=k.device)[None, :, None].expand(b, hkv, t)  # (B, Hkv, T)
    where = positions[:, None, :].expand(b, hkv, t)  # (B, Hkv, T)
    index, real = pack_order(kept.reshape(b, hkv * t), owner.reshape(b, hkv * t), where.reshape(b, hkv * t), hkv * slots)
    parts = [where[..., None], scores.float()[..., None]] + ([method_state] if method_state is not None else []) \
        + [owner[..., None].float()]
    state = torch.cat(parts, dim=-1).reshape(b, hkv * t, -1)  # (B, Hkv * T, C)
    return pack(k.reshape(b, hkv * t, d), v.reshape(b, hkv * t, v.shape[-1]), state, index, real, hkv)


def head_view(row: Tensor, owner: Tensor, heads: int) -> Tensor:
    """Each head's view of a row of slots: row (B, F) of positions -> (B, heads, F), the slots another
    head owns at -1 (empty). owner (B, F)."""
    mine = owner[:, None, :] == torch.arange(heads, device=owner.device)[None, :, None]  # (B, heads, F)
    return torch.where(mine, row[:, None, :], -1.0)


def by_owner(per_head: Tensor, owner: Tensor) -> Tensor:
    """Each slot's value in its owner's view: per_head (B, Hkv, F, ...) -> (B, F, ...)."""
    index = owner.clamp(min=0).long()[:, None, :]  # (B, 1, F); an empty slot reads head 0's (it is empty there too)
    index = index.view(*index.shape, *[1] * (per_head.dim() - 3)).expand(-1, -1, -1, *per_head.shape[3:])
    return per_head.gather(1, index).squeeze(1)


def packed_attention(query: Tensor, keys: Tensor, values: Tensor, position: Tensor, owner: Tensor,
                     query_positions: Tensor, scale: float, softcap: float | None) -> tuple[Tensor, Tensor]:
    """Attention of n new queries over a packed cache: query (B, Hq, n, D); keys, values (B, Hkv, L, D)
    (every head's tokens and the new ones, in place); position, owner (B, Hkv * L) of each slot;
    query_positions (B, n). A query of head h sees the real slots h owns at or before its position.
    Returns the output (B, Hq, n, D) and the probabilities (B, Hkv, G, n, Hkv * L) fp32."""
    b, hkv, length, d = keys.shape
    n = query.shape[2]
    row_k = keys.reshape(b, 1, hkv * length, d).expand(b, hkv, hkv * length, d)  # every head reads the whole row
    row_v = values.reshape(b, 1, hkv * length, values.shape[-1])
    mine = head_view(position, owner, hkv)  # (B, Hkv, F)
    visible = (mine[:, :, None, :] >= 0) & (mine[:, :, None, :] <= query_positions[:, None, :, None])  # (B, Hkv, n, F)
    probs = grouped_probs(query, row_k, scale, visible, softcap)  # (B, Hkv, G, n, F)
    out = torch.matmul(probs.flatten(2, 3), row_v.float())  # (B, Hkv, G * n, D)
    return out.view(b, hkv, -1, n, out.shape[-1]).flatten(1, 2).to(query.dtype), probs  # (B, Hq, n, D)


def _rescore(config: KVConfig, query: Tensor, keys: Tensor, row: Tensor, query_positions: Tensor, probs: Tensor | None,
             scale: float, softcap: float | None) -> tuple[Tensor, Tensor | None]:
    """The method's scores and state of every slot of a packed row, each read in its owner's view:
    keys (B, Hkv, L, D); row (B, F, C) the slots' state (the new tokens' method state zero);
    query_positions (B, n) the new tokens'. Returns scores (B, F) and the method state (B, F, S) or None."""
    b, hkv, length, d = keys.shape
    owner = row[..., OWNER]
    method_state = row[..., FIXED_STATE:OWNER]
    inputs = ScoreInputs(query, keys.reshape(b, 1, hkv * length, d).expand(b, hkv, hkv * length, d), scale,
                         head_view(row[..., POSITION], owner, hkv), query_positions,
                         state=method_state[:, None].expand(b, hkv, *method_state.shape[1:]) if config.STATE_SIZE else None,
                         probs=probs, softcap=softcap)
    scores, new_state = config.score(inputs)  # (B, Hkv, F), (B, Hkv, F, S)
    return by_owner(scores, owner), None if new_state is None else by_owner(new_state, owner)


def _state(position: Tensor, priority: Tensor, method_state: Tensor | None, owner: Tensor) -> Tensor:
    """A row's state (B, F, C) from its channels (B, F) and the method state (B, F, S) or None."""
    parts = [position[..., None], priority[..., None]] + ([method_state] if method_state is not None else []) \
        + [owner[..., None]]
    return torch.cat(parts, dim=-1)


def packed_decode(query: Tensor, k_new: Tensor, v_new: Tensor, cache_k: Tensor, cache_v: Tensor, state: Tensor, *,
                  spec: str, scale: float, softcap: float | None, evict: bool) -> tuple[Tensor, Tensor]:
    """One decode step over a packed cache, written in place: ``decode.slot_decode`` with each head's
    token in a slot that head owns. query (B, Hq, 1, D); k_new, v_new (B, Hkv, 1, D); cache_k, cache_v
    (B, Hkv, P, D); state (B, Hkv, P, C). Returns the output (B, Hq, 1, D) and the new state."""
    config = config_of(spec)
    b, hkv, p, _ = state.shape  # sizes from the state alone: its placeholder's sizes have no source of their own
    row = state.flatten(1, 2)  # (B, F, C)
    position, priority, owner = row[..., POSITION], row[..., PRIORITY], row[..., OWNER]
    mine = head_view(position, owner, hkv)  # (B, Hkv, F)
    if evict:
        slot = priority[:, None, :].masked_fill(mine < 0, float("inf")).argmin(dim=-1)  # (B, Hkv)
    else:
        slot = (mine == FREE).float().argmax(dim=-1)  # (B, Hkv): the head's first free slot (other heads' are -1)
    rows = torch.arange(b, device=slot.device)[:, None]  # (B, 1)
    cache_k.index_put_((rows, slot // p, slot % p), k_new[:, :, 0])  # in place: one token per head
    cache_v.index_put_((rows, slot // p, slot % p), v_new[:, :, 0])
    new_position = new_positions(state, 1)  # (B, 1)
    position = position.scatter(1, slot, new_position.expand(b, hkv))
    method_state = row[..., FIXED_STATE:OWNER].scatter(1, slot[..., None].expand(b, hkv, config.STATE_SIZE), 0.0)
    out, probs = packed_attention(query, cache_k, cache_v, position, owner, new_position, scale, softcap)
    if not evict:
        return out, _state(position, priority, method_state, owner).view_as(state)
    row = _state(position, priority, method_state, owner)
    scores, new_method_state = _rescore(config, query, cache_k, row, new_position, probs, scale, softcap)
    priority = scores.masked_fill(position < 0, float("inf"))
    return out, _state(position, priority, new_method_state, owner).view_as(state)


def packed_continuation(query: Tensor, keys: Tensor, values: Tensor, state: Tensor, *, spec: str, scale: float,
                        softcap: float | None, evict: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """n new tokens appended to every row of a packed cache of P slots per row (HF's cache: the new
    tokens of head r at the end of row r): query (B, Hq, n, D); keys, values (B, Hkv, P + n, D);
    state (B, Hkv, P, C). Returns the attention output (B, Hq, n, D), and the cache after them: keys,
    values and state, of P + n slots per row, or with ``evict`` repacked to P slots per row, each
    head keeping as many real slots as it had."""
    config = config_of(spec)
    b, hkv, length, d = keys.shape
    n = query.shape[2]
    old = state.flatten(1, 2)  # (B, Hkv * P, C)
    added = new_positions(state, n)  # (B, n)
    fresh = state.new_zeros((b, hkv, n, state.shape[-1]))
    fresh[..., POSITION] = added[:, None, :]
    grown = torch.cat([state, row_owners(fresh)], dim=2)  # (B, Hkv, P + n, C): the layout of HF's appended cache
    row = grown.reshape(b, hkv * length, state.shape[-1])
    out, probs = packed_attention(query, keys, values, row[..., POSITION], row[..., OWNER], added, scale, softcap)
    if not evict:
        return out, keys, values, grown
    scores, method_state = _rescore(config, query, keys, row, added, probs, scale, softcap)
    row = _state(row[..., POSITION], scores, method_state, row[..., OWNER])
    counts = (head_view(old[..., POSITION], old[..., OWNER], hkv) >= 0).sum(dim=-1)  # (B, Hkv): real slots per head
    mine = head_view(row[..., POSITION], row[..., OWNER], hkv)  # (B, Hkv, F)
    ranked = torch.where(mine >= 0, scores[:, None, :].clamp(-_TOP, _TOP), float("-inf"))
    rank = ranked.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # (B, Hkv, F)
    kept = ((rank < counts[..., None]) & (mine >= 0)).any(dim=1)  # (B, F): each slot has one owner
    index, real = pack_order(kept, row[..., OWNER].long(), row[..., POSITION], old.shape[1])
    flat_k, flat_v = keys.reshape(b, hkv * length, d), values.reshape(b, hkv * length, values.shape[-1])
    return (out, *pack(flat_k, flat_v, row, index, real, hkv))


def row_owners(state: Tensor) -> Tensor:
    """Row r's slots owned by head r (a cache the backend did not pack, free slots), in place:
    state (B, Hkv, L, C). Returns it."""
    state[..., OWNER] = torch.arange(state.shape[1], device=state.device, dtype=state.dtype)[None, :, None]
    return state
