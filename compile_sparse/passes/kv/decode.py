"""Calls over a cache the prefill already compressed (run side: plain torch code the compiled graph
runs, so that Inductor compiles it with the model).

A cache's slots are not in position order once a decode step has written into a freed slot; each
slot's state says its true position (-1: empty, -2: free for a token to come, in a StaticCache
that keeps a prompt-only method's prompt and the tokens after it). Keys carry RoPE already, so
slot order does not matter to attention: every cached token precedes every new token, and a new
token sees all the real slots. A forward of several new tokens (``continuation_*``) appends them
after the slots, with a mask that lets new token i see the real slots and new tokens 0..i.

- ``slot_decode``: one new token, written in place into the slot its method frees (the lowest
  priority, i.e. the lowest score of the previous call) or into the first free slot: no copy of
  the cache, a fixed size, one compiled graph for every step.
- ``continuation_mask`` / ``continuation_state``: several new tokens over a DynamicCache, or
  decode with eviction off: the cache grows (``evict``: the method keeps the cache at its size).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...reference import grouped_probs
from .packed import row_owners
from .prefill import gather_tokens, kept_state, select_slots
from .scoring import FIXED_STATE, FREE, POSITION, PRIORITY, ScoreInputs, config_of, new_positions


def slot_decode(query: Tensor, k_new: Tensor, v_new: Tensor, cache_k: Tensor, cache_v: Tensor, state: Tensor, *,
                spec: str, scale: float, softcap: float | None, evict: bool) -> tuple[Tensor, Tensor]:
    """One decode step over a slotted cache, written in place.

    query (B, Hq, 1, D); k_new, v_new (B, Hkv, 1, D); cache_k, cache_v (B, Hkv, P, D), the cache
    tensors themselves; state (B, Hkv, P, 2 + S). With ``evict`` the new token takes the slot of
    the lowest priority (the method's decode rule), else the first free slot. Returns the attention
    output (B, Hq, 1, D) over the P slots and the new state.
    """
    config = config_of(spec)
    b, hkv, _, d = cache_k.shape
    position, priority, method_state = state[..., POSITION], state[..., PRIORITY], state[..., FIXED_STATE:]
    if evict:
        slot = priority.masked_fill(position < 0, float("inf")).argmin(dim=-1)  # (B, Hkv)
    else:
        slot = (position == FREE).float().argmax(dim=-1)  # (B, Hkv): the first free slot
    rows = torch.arange(b, device=slot.device)[:, None]  # (B, 1)
    heads = torch.arange(hkv, device=slot.device)[None, :]  # (1, Hkv)
    cache_k.index_put_((rows, heads, slot), k_new[:, :, 0])  # in place: one token written
    cache_v.index_put_((rows, heads, slot), v_new[:, :, 0])
    new_position = new_positions(state, 1)  # (B, 1)
    position = position.index_put((rows, heads, slot), new_position.expand(b, hkv))
    method_state = method_state.index_put((rows, heads, slot), method_state.new_zeros(b, hkv, method_state.shape[-1]))
    valid = position >= 0  # (B, Hkv, P)
    probs = grouped_probs(query, cache_k, scale, valid[:, :, None, :], softcap)  # (B, Hkv, G, 1, P)
    out = torch.matmul(probs.flatten(2, 3), cache_v.float())  # (B, Hkv, G, D)
    out = out.reshape(b, query.shape[1], 1, d).to(query.dtype)  # (B, Hq, 1, D)
    if not evict:
        return out, torch.cat([position[..., None], state[..., PRIORITY:]], dim=-1)
    inputs = ScoreInputs(query, cache_k, scale, position, new_position, state=method_state if config.STATE_SIZE else None,
                         probs=probs, softcap=softcap)
    scores, new_method_state = config.score(inputs)
    parts = [position[..., None], scores.masked_fill(~valid, float("inf"))[..., None]]
    if new_method_state is not None:
        parts.append(new_method_state)
    return out, torch.cat(parts, dim=-1)


def continuation_mask(state: Tensor, query: Tensor) -> Tensor:
    """The attention mask (B, 1, n, P + n) bool of the n new tokens of ``query`` (B, Hq, n, D)
    appended after P slots: every real slot, and the new tokens up to each one's own."""
    n = query.shape[2]
    real = (state[:, 0, :, POSITION] >= 0)[:, None, None, :]  # (B, 1, 1, P): the same slots are real in every head
    causal = torch.ones(n, n, dtype=torch.bool, device=state.device).tril()  # (n, n)
    b, slots = state.shape[0], state.shape[2]
    return torch.cat([real.expand(b, 1, n, slots), causal.expand(b, 1, n, n)], dim=-1)


def continuation_state(query: Tensor, keys: Tensor, values: Tensor, state: Tensor, *, spec: str, scale: float,
                       softcap: float | None, evict: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The cache after n new tokens were appended to P slots: keys, values (B, Hkv, P + n, D) and
    the state; with ``evict``, the method keeps each row's real slots at their number (the cache
    stays at P slots). query (B, Hq, n, D)."""
    config = config_of(spec)
    b, hkv, length, _ = keys.shape
    n = query.shape[2]
    new_position = new_positions(state, n)  # (B, n)
    position = torch.cat([state[..., POSITION], new_position[:, None, :].expand(b, hkv, n)], dim=-1)  # (B, Hkv, P + n)
    fresh = state.new_zeros((b, hkv, n, state.shape[-1] - 1))  # the new tokens' priority and method state
    grown = torch.cat([state[..., PRIORITY:], fresh], dim=2)  # (B, Hkv, P + n, C - 1)
    if not evict:
        return keys, values, torch.cat([position[..., None], grown], dim=-1)
    method_state = grown[..., FIXED_STATE - 1:] if config.STATE_SIZE else None
    scores, new_method_state = config.score(ScoreInputs(query, keys, scale, position, new_position, state=method_state,
                                                        softcap=softcap))
    real_past = (state[:, 0, :, POSITION] >= 0).sum(dim=-1)  # (B,): each row keeps as many real slots as it had
    index, kept = select_slots(scores, position, real_past, state.shape[2])
    return gather_tokens(keys, index), gather_tokens(values, index), kept_state(scores, new_method_state, position,
                                                                               index, kept)


def pad_free(keys: Tensor, values: Tensor, state: Tensor, holder: Tensor, dim: int, new: Tensor, *,
             packed: bool) -> tuple[Tensor, Tensor, Tensor]:
    """A StaticCache for a method without a decode rule keeps the prompt's slots (B, Hkv, K, D),
    then as many free slots as the buffer has room for tokens after the prompt (its length,
    ``holder.shape[dim]``, minus the prompt's tokens, ``new.shape[2]``), for the decode steps to
    fill. Returns keys, values and state with the free slots (position FREE) appended; in a
    ``packed`` cache row r's free slots are head r's."""
    extra = holder.shape[dim] - new.shape[2]
    free = state.new_zeros((*state.shape[:2], extra, state.shape[-1]))
    free[..., POSITION] = FREE
    if packed:
        row_owners(free)
    pad = (0, 0, 0, extra)
    return (torch.nn.functional.pad(keys, pad), torch.nn.functional.pad(values, pad),
            torch.cat([state, free], dim=2))
