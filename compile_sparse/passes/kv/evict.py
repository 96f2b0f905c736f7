"""One layer's eviction (run side: called inside the compiled graph, once per attention site).

The graph carries the method as its registered name and parameters (graph code and dumps need
plain values); ``evict_kv`` rebuilds the config through the registry and keeps the top tokens.
"""

from __future__ import annotations

import torch

from ..registry import build
from .scoring import ScoreInputs


def gather_tokens(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor (B, Hkv, T, E), index (B, Hkv, K) -> (B, Hkv, K, E)."""
    return tensor.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, tensor.shape[-1]))


def evict_kv(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, state: torch.Tensor | None = None, *,
             method: str, params: dict, layer: int, num_layers: int, prefill: bool, scale: float,
             causal: bool, kernels: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Keep the budgeted tokens of one layer's cache.

    query (B, H, n, D); keys, values (B, Hkv, P + n, D); state (B, Hkv, P, S) or None.
    Returns keys and values (B, Hkv, K, D) and the state (B, Hkv, K, S) of the kept tokens (None
    for stateless methods), K = config.kept_tokens(...): the budget on a prefill, else P.
    """
    config = build("kv", method, params)
    n, length = query.shape[2], keys.shape[2]
    past_len = length - n
    scores, new_state = config.score(ScoreInputs(query, keys, scale, causal, past_len, state, kernels))
    kept = config.kept_tokens(prefill, layer, num_layers, length, past_len)
    if kept == length - 1:  # one token goes (a decode step): skip the lowest, no sort needed
        position = torch.arange(kept, device=keys.device)  # (K,)
        index = position + (position >= scores.argmin(dim=-1, keepdim=True))  # (B, Hkv, K), in cache order
    else:
        index = scores.topk(kept, dim=-1).indices.sort(dim=-1).values  # (B, Hkv, K), in cache order
    kept_state = gather_tokens(new_state, index) if new_state is not None else None
    return gather_tokens(keys, index), gather_tokens(values, index), kept_state
