"""A prompt's eviction (run side): two custom ops the compiled graph calls once per attention site.

- ``compile_sparse::kv_attention_totals`` replaces the attention of a prefill for methods that score
  with every query's attention (H2O, HitKV): the output and the method's per-token totals come from
  the same chunks of attention rows, so the scores cost no second pass over the queries.
- ``compile_sparse::kv_prefill`` scores the prompt's tokens and keeps each row's budget.

Both are opaque to Dynamo and Inductor: their fake implementations give the output sizes as
expressions of the prompt length (symbolic when Dynamo made it so), so one compiled graph serves
every prompt length, and the Python loops over query chunks run on concrete sizes.

The state a prefill returns per token: [position, priority, method state...], position -1 for an
empty slot (the padding of a short row in a left-padded batch), priority the token's last score.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ...codegen import cpu as cpu_kernels
from ...state import is_resizable
from .packed import packed_prefill
from .scoring import POSITION, KVConfig, ScoreInputs, config_of

ATTENTION_CHUNK = 128  # queries per chunk of the attention with totals


def real_positions(valid: Tensor | None, batch: int, length: int, device: torch.device) -> Tensor:
    """True positions (B, T) fp32 of a prompt's tokens: their rank among the row's real tokens,
    -1 for padding (valid (B, T) bool, None when every token is real)."""
    if valid is None:
        return torch.arange(length, device=device, dtype=torch.float32).expand(batch, length)
    return torch.where(valid, valid.long().cumsum(dim=-1) - 1, -1).float()


def select_slots(scores: Tensor, positions: Tensor, keep: Tensor, slots: int) -> tuple[Tensor, Tensor]:
    """Keep the ``keep`` (B,) highest-scoring real tokens of each row in ``slots`` slots: (index
    (B, Hkv, slots), kept (B, Hkv, slots) bool). Kept tokens come first, in position order; the
    slots after them (a row keeping fewer than ``slots``) hold tokens marked not kept."""
    ranked = scores.masked_fill(positions < 0, float("-inf"))
    top = ranked.topk(slots, dim=-1).indices  # (B, Hkv, K), best first
    kept = torch.arange(slots, device=scores.device) < keep[:, None, None]  # (B, 1, K)
    order_key = torch.where(kept, positions.gather(-1, top), float("inf"))  # not kept: after, in rank order
    index = top.gather(-1, order_key.argsort(dim=-1, stable=True))  # (B, Hkv, K)
    return index, kept.expand_as(index).clone()


def gather_tokens(tensor: Tensor, index: Tensor) -> Tensor:
    """tensor (B, Hkv, T, E), index (B, Hkv, K) -> (B, Hkv, K, E)."""
    return tensor.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, tensor.shape[-1]))


def kept_state(scores: Tensor, method_state: Tensor | None, positions: Tensor, index: Tensor, kept: Tensor) -> Tensor:
    """The state of the kept slots: (B, Hkv, K, 2 + S) = [position (-1 if not kept), priority, method state]."""
    position = positions.gather(-1, index).masked_fill(~kept, -1.0)
    parts = [position[..., None], scores.gather(-1, index)[..., None]]
    if method_state is not None:
        parts.append(gather_tokens(method_state, index))
    return torch.cat(parts, dim=-1)


# ---------------------------------------------------------------------------------------------
# Attention with the method's per-token totals
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("compile_sparse::kv_attention_totals", mutates_args=())
def attention_totals(q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None, scale: float, softcap: float | None,
                     spec: str) -> tuple[Tensor, Tensor]:
    """Causal attention of q (B, Hq, T, D) over k, v (B, Hkv, T, D) (``valid`` (B, T): the real
    tokens, None: all) with the method's per-token totals (B, Hkv, T) fp32 (its ``per_query`` summed
    over every query); the output in q's dtype and layout, 0 for a padding query that sees nothing.
    On CPU the native kernel computes both in one pass where the method has a native rule
    (codegen/cpu.py); otherwise ``attention_totals_torch``."""
    config = config_of(spec)
    rule = config.native_per_query()
    if q.device.type == "cpu" and rule is not None and cpu_kernels.available():
        out, totals = cpu_kernels.attention_totals(q, k, v, valid, scale, softcap, rule)
        return torch.empty_like(q).copy_(out), totals
    return attention_totals_torch(q, k, v, valid, scale, softcap, config)


@attention_totals.register_fake
def _(q, k, v, valid, scale, softcap, spec):
    return torch.empty_like(q), q.new_empty((q.shape[0], k.shape[1], q.shape[2]), dtype=torch.float32)


def attention_totals_torch(q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None, scale: float,
                           softcap: float | None, config: KVConfig) -> tuple[Tensor, Tensor]:
    """``kv_attention_totals`` in torch: ATTENTION_CHUNK queries at a time, each chunk over the keys
    it can see, each chunk's rows also reduced into the totals (the column sums as a product with
    the rows' normalizers, never materializing the probabilities)."""
    column_sums = config.native_per_query() == 0
    b, hq, length, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    queries = (q.float() * scale).view(b, hkv, group, length, d)  # (B, Hkv, G, T, D)
    keys, values = k.float(), v.float()
    out = torch.empty_like(q)
    totals = q.new_zeros((b, hkv, length), dtype=torch.float32)
    for start in range(0, length, ATTENTION_CHUNK):
        stop = min(start + ATTENTION_CHUNK, length)
        c = stop - start
        rows = queries[:, :, :, start:stop].reshape(b, hkv, group * c, d)  # (B, Hkv, G * c, D)
        logits = torch.matmul(rows, keys[:, :, :stop].transpose(-1, -2))  # (B, Hkv, G * c, S)
        if softcap is not None:
            logits = torch.tanh(logits.div_(softcap)).mul_(softcap)
        grid = logits.view(b, hkv, group, c, stop)
        grid[..., start:].masked_fill_(torch.ones(c, c, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        if valid is not None:
            grid.masked_fill_(~valid[:, None, None, None, :stop], float("-inf"))
        top = logits.amax(dim=-1, keepdim=True).clamp(min=-1e30)  # a padding row that sees nothing: finite
        weights = logits.sub_(top).exp_()  # unnormalized probabilities, in place
        inverse = weights.sum(dim=-1, keepdim=True).reciprocal_().nan_to_num_(0.0, posinf=0.0)  # (B, Hkv, G * c, 1)
        if valid is not None:  # padding queries observe nothing and output 0
            inverse = inverse * valid[:, None, None, start:stop, None].expand(b, 1, group, c, 1).reshape(b, 1, group * c, 1)
        chunk = torch.matmul(weights, values[:, :, :stop]) * inverse  # (B, Hkv, G * c, D)
        out[:, :, start:stop] = chunk.view(b, hkv, group, c, d).flatten(1, 2).to(q.dtype)
        if column_sums:
            totals[:, :, :stop] += torch.matmul(inverse.transpose(-1, -2), weights).squeeze(-2)  # (B, Hkv, S)
        else:
            totals[:, :, :stop] += config.per_query(weights.mul_(inverse).view(b, hkv, group, c, stop))
    return out, totals


# ---------------------------------------------------------------------------------------------
# Scoring and keeping the budget
# ---------------------------------------------------------------------------------------------


def slots_of(config: KVConfig, layer: int, num_layers: int, length: Any) -> Any:
    """Slots a layer's cache holds after a prefill of ``length`` tokens: the budget of a row with
    no padding (symbolic when the length is)."""
    return config.budget(layer, num_layers, length)


def keep_budgets(config: KVConfig, k: Tensor, v: Tensor, scores: Tensor, method_state: Tensor | None,
                 positions: Tensor, real: list[int], layer: int, num_layers: int) -> tuple[Tensor, Tensor, Tensor]:
    """Keep each row's budget of T scored tokens: k, v (B, Hkv, T, D); scores (B, Hkv, T); method_state
    (B, Hkv, T, C') or None; positions (B, Hkv, T) (-1: padding); real, each row's real token count.
    Returns k, v (B, Hkv, K, D) and the state (B, Hkv, K, C), K the budget of T, packed when the
    config is (per-head budgets: passes/kv/packed.py). Shared by the prefill and the re-read."""
    slots = slots_of(config, layer, num_layers, k.shape[2])
    keep = torch.tensor([min(slots, config.budget(layer, num_layers, n)) if n else 0 for n in real], device=k.device)
    if config.packed:
        return packed_prefill(k, v, scores, method_state, positions[:, 0], keep, slots, config.head_floor)
    index, kept = select_slots(scores, positions, keep, slots)
    state = kept_state(scores, method_state, positions, index, kept)
    return gather_tokens(k, index), gather_tokens(v, index), state


@torch.library.custom_op("compile_sparse::kv_prefill", mutates_args=())
def kv_prefill(q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None, totals: Tensor | None, spec: str, layer: int,
               num_layers: int, scale: float, softcap: float | None, kernels: str, cos: Tensor | None = None,
               sin: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Keep the budget of one layer's prompt: q (B, Hq, T, D); k, v (B, Hkv, T, D); valid (B, T)
    (None: no padding); totals (B, Hkv, T) from kv_attention_totals or None; cos, sin: RoPE's
    tables at the query, broadcasting to it (HF: (B, 1, T, D)), or None. Each row keeps the budget
    of its own real length. Returns k, v (B, Hkv, K, D) and the state (B, Hkv, K, C), K the
    budget of the full length, C = ``config.state_channels``. A packed config (per-head budgets) packs
    them (passes/kv/packed.py)."""
    config = config_of(spec)
    b, hkv, length, _ = k.shape
    positions = real_positions(valid, b, length, k.device)  # (B, T)
    rope = None
    if cos is not None and sin is not None:
        rope = tuple(t.expand(q.shape)[:, 0].float() for t in (cos, sin))  # (B, T, D) each
    inputs = ScoreInputs(q, k, scale, positions[:, None, :].expand(b, hkv, length), positions, totals=totals,
                         plain=valid is None, kernels=kernels, softcap=softcap, values=v, rope=rope)
    scores, method_state = config.score(inputs)
    real = [length] * b if valid is None else valid.sum(dim=-1).tolist()
    return keep_budgets(config, k, v, scores, method_state, inputs.positions, real, layer, num_layers)


@kv_prefill.register_fake
def _(q, k, v, valid, totals, spec, layer, num_layers, scale, softcap, kernels, cos=None, sin=None):
    config = config_of(spec)
    b, hkv, length, d = k.shape
    slots = slots_of(config, layer, num_layers, length)
    return (k.new_empty((b, hkv, slots, d)), v.new_empty((b, hkv, slots, v.shape[-1])),
            k.new_empty((b, hkv, slots, config.state_channels), dtype=torch.float32))


# ---------------------------------------------------------------------------------------------
# Where a StaticCache keeps them
# ---------------------------------------------------------------------------------------------


def pad_empty(state: Tensor, length: int) -> Tensor:
    """The state of K slots (B, Hkv, K, S), then empty slots (position -1) up to ``length``."""
    empty = state.new_zeros((*state.shape[:2], length - state.shape[2], state.shape[-1]))
    empty[..., POSITION] = -1.0
    return torch.cat([state, empty], dim=2)


def widest(keys: Tensor, values: Tensor, state: Tensor, new: Tensor, *, spec: str,
           num_layers: int) -> tuple[Tensor, Tensor, Tensor]:
    """Pad a layer's kept slots with empty ones to the widest layer's budget (for a prompt of
    ``new.shape[2]`` tokens): one attention mask serves every layer of a StaticCache, so its
    buffers share one length even when the method's budgets differ per layer (PyramidKV)."""
    config = config_of(spec)
    length = new.shape[2]
    slots = max(config.budget(layer, num_layers, length) for layer in range(num_layers))
    extra = slots - keys.shape[2]
    pad = (0, 0, 0, extra)
    return (torch.nn.functional.pad(keys, pad), torch.nn.functional.pad(values, pad),
            pad_empty(state, state.shape[2] + extra))


def write_prefix(buffer_k: Tensor, buffer_v: Tensor, keys: Tensor, values: Tensor, state: Tensor) -> Tensor:
    """Write the kept slots (B, Hkv, K, D) at the start of full-length StaticCache buffers, in
    place; the slots after them are empty. Returns the state of every buffer slot."""
    slots = keys.shape[2]
    buffer_k[:, :, :slots] = keys
    buffer_v[:, :, :slots] = values
    return pad_empty(state, buffer_k.shape[2])


def keep_in_buffers(buffers: list[Tensor], kept: list[Tensor], state: Tensor, *, resize: bool) -> Tensor:
    """After a prompt over StaticCache buffers passed in: with ``resize`` (every full-attention layer
    of the graph compressed), buffers HF's StaticLayer allocated take the kept slots' size
    (``set_``, compile_sparse.cache); otherwise they keep their length, the kept slots written at
    their start."""
    if resize and all(is_resizable(buffer) for buffer in buffers):
        for buffer, tokens in zip(buffers, kept):
            buffer.set_(tokens)
        return state
    if resize:
        from ...backend import notify

        notify(("static buffers",), "a StaticCache whose buffers were not allocated by HF's StaticLayer after "
               "compile_sparse was imported: the budget is kept inside its full-length buffers (eviction holds, "
               "the memory is not saved); import compile_sparse before allocating the cache", False)
    return write_prefix(*buffers, *kept, state)
