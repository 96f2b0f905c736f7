"""Quality protocols from EVAL.md.

ctx-continuation (KV eviction): per document, prefill tokens [0, 1024) with the method on, then
score the continuation [1024, 1152) over the compressed cache with the true positions
1024..1151. The metric is the perplexity of the 128 continuation tokens (the first predicted by
the last context position); a run reports it per document and the geometric mean of
ppl_method / ppl_dense.

window-ppl (weight pruning): per document, the first 2048 tokens in 4 windows of 512, each
scored on its own (511 predicted tokens a window); the perplexity over all windows, per document
and as the geometric mean of ppl_method / ppl_dense.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

CONTEXT = 1024
CONTINUATION = 128
WINDOW = 512
WINDOWS = 4


@dataclass
class PerplexityResult:
    """Per-document perplexities of one setting (either protocol) and its geometric-mean ratio to dense."""

    name: str
    ppl: dict[str, float] = field(default_factory=dict)
    ppl_dense: dict[str, float] = field(default_factory=dict)
    cache_tokens: list[int] = field(default_factory=list)  # per layer, after the prefill of the last document

    @property
    def ppl_ratio(self) -> float:
        logs = [math.log(self.ppl[d] / self.ppl_dense[d]) for d in self.ppl]
        return math.exp(sum(logs) / len(logs))

    def to_dict(self) -> dict:
        return {"name": self.name, "ppl_ratio": self.ppl_ratio, "ppl": self.ppl, "ppl_dense": self.ppl_dense,
                "geomean_ppl": math.exp(sum(math.log(p) for p in self.ppl.values()) / len(self.ppl)),
                "cache_tokens": self.cache_tokens}


def document_ids(tokenizer: Any, documents: list[tuple[str, str]],
                 length: int = CONTEXT + CONTINUATION) -> dict[str, torch.Tensor]:
    """The first ``length`` tokens of each document: name -> (1, length). Documents too short are an error."""
    out = {}
    for name, text in documents:
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :length]  # (1, length)
        if ids.shape[1] < length:
            raise ValueError(f"document {name} has {ids.shape[1]} tokens, the protocol needs {length}")
        out[name] = ids
    return out


def continuation_nll(prefill: Callable, forward: Callable, ids: torch.Tensor, *, context: int = CONTEXT,
                     one_token_at_a_time: bool = False) -> tuple[float, list[int]]:
    """Mean NLL of ids[:, context:] after ``prefill(ids[:, :context]) -> (last logits (1, V), cache)``;
    ``forward(input_ids, cache, position_ids) -> logits`` scores the continuation over that cache,
    in one forward or (for caches whose layers differ in length) one token at a time.
    Returns the NLL and the cache length per layer after the prefill."""
    last_logits, cache = prefill(ids[:, :context])
    cache_tokens = [layer.keys.shape[-2] for layer in cache.layers]
    continuation = ids[:, context:]  # (1, C)
    positions = torch.arange(context, ids.shape[1])[None]  # (1, C): true positions
    if one_token_at_a_time:
        logits = torch.cat([forward(continuation[:, i:i + 1], cache, positions[:, i:i + 1])
                            for i in range(continuation.shape[1] - 1)], dim=1)  # (1, C - 1, V)
    else:
        logits = forward(continuation[:, :-1], cache, positions[:, :-1])  # (1, C - 1, V)
    all_logits = torch.cat([last_logits[:, None], logits], dim=1)[0]  # (C, V): predicts continuation
    return F.cross_entropy(all_logits.float(), continuation[0]).item(), cache_tokens


def model_prefill(model: Callable) -> Callable:
    """prefill for continuation_nll through ``model`` (a model or its compiled forward)."""

    def prefill(ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        out = model(input_ids=ids, use_cache=True)
        return out.logits[:, -1], out.past_key_values

    return prefill


def truncate_prefill(model: Callable, ratio: float) -> Callable:
    """The naive baseline: prefill only the last floor(T * (1 - ratio)) context tokens, at their true positions."""

    def prefill(ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        total = ids.shape[1]
        kept = max(1, math.floor(total * (1 - ratio)))
        positions = torch.arange(total - kept, total)[None]  # (1, kept)
        out = model(input_ids=ids[:, -kept:], position_ids=positions, use_cache=True)
        return out.logits[:, -1], out.past_key_values

    return prefill


def model_forward(model: Callable) -> Callable:
    def forward(ids: torch.Tensor, cache: Any, positions: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, past_key_values=cache, position_ids=positions, use_cache=True).logits

    return forward


def ctx_continuation(name: str, prefill: Callable, forward: Callable, docs: dict[str, torch.Tensor],
                     dense: dict[str, float], *, context: int = CONTEXT,
                     one_token_at_a_time: bool = False) -> PerplexityResult:
    """Run the protocol for one setting over ``docs`` (name -> ids (1, context + continuation));
    ``dense`` holds dense ppl per document."""
    result = PerplexityResult(name, ppl_dense=dict(dense))
    with torch.no_grad():
        for i, (doc, ids) in enumerate(docs.items()):
            nll, result.cache_tokens = continuation_nll(prefill, forward, ids, context=context,
                                                        one_token_at_a_time=one_token_at_a_time)
            result.ppl[doc] = math.exp(nll)
            print(f"\r  {name}: document {i + 1}/{len(docs)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return result


def dense_ppl(model: Callable, docs: dict[str, torch.Tensor], context: int = CONTEXT) -> dict[str, float]:
    result = ctx_continuation("dense", model_prefill(model), model_forward(model), docs, {d: 1.0 for d in docs},
                              context=context)
    return result.ppl


def compiled_forward(model: torch.nn.Module, options: dict) -> Callable:
    """``model.forward`` compiled with the sparse backend and ``options``."""
    return torch.compile(model.forward, backend="sparse", options=options)


def document_windows(tokenizer: Any, documents: list[tuple[str, str]], window: int = WINDOW,
                     count: int = WINDOWS) -> dict[str, torch.Tensor]:
    """The first ``count`` windows of ``window`` tokens of each document: name -> (count, window)."""
    return {name: ids.view(count, window)  # (count, window)
            for name, ids in document_ids(tokenizer, documents, length=window * count).items()}


def window_ppl(name: str, forward: Callable, docs: dict[str, torch.Tensor],
               dense: dict[str, float] | None = None) -> PerplexityResult:
    """window-ppl for one setting: ``forward(ids (1, W)) -> logits (1, W, V)`` scores each window of
    ``docs`` (name -> (windows, W)) on its own; ``dense`` holds dense ppl per document (None: this
    is the dense run, ratios 1)."""
    result = PerplexityResult(name)
    with torch.no_grad():
        for i, (doc, windows) in enumerate(docs.items()):
            nll = sum(F.cross_entropy(forward(w[None])[0, :-1].float(), w[1:], reduction="sum").item()
                      for w in windows)
            result.ppl[doc] = math.exp(nll / (windows.numel() - windows.shape[0]))
            print(f"\r  {name}: document {i + 1}/{len(docs)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    result.ppl_dense = dict(dense) if dense is not None else dict(result.ppl)
    return result


def logits_forward(model: Callable) -> Callable:
    """``ids -> logits`` through ``model`` (a model or its compiled forward) without a cache."""
    return lambda ids: model(input_ids=ids, use_cache=False).logits
