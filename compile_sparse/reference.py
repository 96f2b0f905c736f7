"""The fp32 attention reference that scorers, selectors and the kernels' torch references share.

Shapes: q (B, Hq, T, D); k (B, Hkv, L, D) with Hq = Hkv x G (query head h reads KV head h // G, as
``repeat_kv`` does). Logits and probabilities are grouped per KV head, (B, Hkv, G, T, L), so the
keys are never repeated; ``.flatten(1, 2)`` gives (B, Hq, T, L).
"""

from __future__ import annotations

import torch
from torch import Tensor


def gqa_group(q: Tensor, num_kv_heads: int) -> int:
    """Query heads per KV head of q (B, Hq, T, D)."""
    if q.shape[1] % num_kv_heads:
        raise ValueError(f"{q.shape[1]} query heads do not divide into {num_kv_heads} KV heads")
    return q.shape[1] // num_kv_heads


def grouped_mask(mask: Tensor, num_kv_heads: int, group: int) -> Tensor:
    """A mask over (.., T, L) with a head axis of 1, Hkv or Hq (4-D), or none (2-D), broadcastable
    to the grouped (B, Hkv, G, T, L)."""
    if mask.dim() < 4:
        return mask
    heads = mask.shape[1]
    if heads == num_kv_heads * group and group > 1:
        return mask.unflatten(1, (num_kv_heads, group))  # (B, Hkv, G, T, L)
    return mask.unsqueeze(2)  # (B, 1 or Hkv, 1, T, L)


def causal_visibility(q_len: int, kv_len: int, device: torch.device, first_query: int = 0) -> Tensor:
    """(q_len - first_query, kv_len) bool, True where query i sees key j: the queries are the last
    q_len positions of the kv_len keys (bottom-right alignment), starting at query ``first_query``."""
    q_pos = torch.arange(first_query, q_len, device=device) + (kv_len - q_len)  # (T',)
    return torch.arange(kv_len, device=device)[None, :] <= q_pos[:, None]


def grouped_logits(q: Tensor, k: Tensor, scale: float, mask: Tensor | None = None,
                   softcap: float | None = None) -> Tensor:
    """fp32 logits (B, Hkv, G, T, L) of q against k, capped to ``softcap * tanh(x / softcap)`` when
    given (Gemma 2); ``mask`` (see grouped_mask) is True where a query sees a key (hidden logits
    are -inf) or, as a float tensor, added to the logits."""
    b, hq, t, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    group = gqa_group(q, hkv)
    rows = q.float().reshape(b, hkv, group * t, d)  # (B, Hkv, G * T, D): one matmul per KV head
    logits = torch.matmul(rows, k.float().transpose(-1, -2)) * scale  # (B, Hkv, G * T, L)
    logits = logits.view(b, hkv, group, t, length)  # (B, Hkv, G, T, L)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if mask is not None:
        mask = grouped_mask(mask, hkv, group)
        logits = logits.masked_fill_(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.float()
    return logits


def grouped_probs(q: Tensor, k: Tensor, scale: float, mask: Tensor | None = None,
                  softcap: float | None = None) -> Tensor:
    """Softmax of ``grouped_logits`` over the keys: (B, Hkv, G, T, L); a row with no visible key is 0."""
    return grouped_logits(q, k, scale, mask, softcap).softmax(dim=-1).nan_to_num_(0.0)


def mask_allows(mask: Tensor, how: str) -> Tensor:
    """Boolean 'may attend' from an attention mask applied as ``how``: "bool_keep" (True attends;
    SDPA's float masks are additive), "bool_block" (True is blocked: masked_fill) or "additive"
    (a large negative value blocks)."""
    if how == "bool_keep":
        return mask.bool() if mask.dtype == torch.bool else mask > -1e3
    if how == "bool_block":
        return ~mask.bool()
    return mask > -1e3
