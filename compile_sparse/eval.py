"""Quality protocols from docs/evaluation.md.

ctx-continuation (KV eviction, token dropping): per document, prefill tokens [0, 1024) with the method on, then
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
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .progress import progress

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
    in one forward or one token at a time (asked, or when the cache's layers differ in length:
    a forward over several new tokens builds one mask for every layer).
    Returns the NLL and the cache length per layer after the prefill."""
    last_logits, cache = prefill(ids[:, :context])
    cache_tokens = [layer.keys.shape[-2] for layer in cache.layers]
    one_token_at_a_time = one_token_at_a_time or len(set(cache_tokens)) > 1
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
    """prefill for continuation_nll through ``model`` (a model or its compiled forward); only the last
    position's logits are computed (``logits_to_keep=1``), which token dropping needs."""

    def prefill(ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], out.past_key_values

    return prefill


def reread_prefill(model: Callable, tokenizer: Any) -> Callable:
    """prefill for continuation_nll through ``compile_sparse.compress_context`` (a KV method that scores
    by a re-read of the context: KVzip)."""
    from .compress import compress_context

    def prefill(ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        cache, logits = compress_context(model, tokenizer, ids)
        return logits, cache

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
        for doc, ids in progress(docs.items(), total=len(docs), desc=name, unit="doc"):
            nll, result.cache_tokens = continuation_nll(prefill, forward, ids, context=context,
                                                        one_token_at_a_time=one_token_at_a_time)
            result.ppl[doc] = math.exp(nll)
    return result


def dense_ppl(model: Callable, docs: dict[str, torch.Tensor], context: int = CONTEXT) -> dict[str, float]:
    result = ctx_continuation("dense", model_prefill(model), model_forward(model), docs, {d: 1.0 for d in docs},
                              context=context)
    return result.ppl


def smollm2_documents(count: int = 8, split: str = "test") -> tuple[Any, Any, dict[str, torch.Tensor], dict[str, float]]:
    """SmolLM2, its tokenizer, the ctx-continuation documents (the ``count`` most recent speeches, or
    with ``split="calibration"`` the ``count`` before them, for choosing parameters) and the dense
    perplexity per document: what every ctx-continuation run starts from."""
    from . import models

    model, tokenizer = models.load("smollm2")
    docs = document_ids(tokenizer, models.sotu_documents(split, count))
    return model, tokenizer, docs, dense_ppl(model, docs)


def calibration_batches(tokenizer: Any, length: int = CONTEXT, count: int = 8) -> list[torch.Tensor]:
    """Calibration data per docs/evaluation.md (the ``count`` speeches before the test ones, never the test
    documents): the first ``length`` tokens of each, as a list of (1, length) batches, shaped like
    the prefill they calibrate."""
    from . import models

    return list(document_ids(tokenizer, models.sotu_documents("calibration", count), length=length).values())


def with_calibration(options: dict, tokenizer: Any, length: int = CONTEXT) -> dict:
    """``options`` (a recipe included) with calibration batches added where the pruning criterion
    reads activations or gradients and none were given (the CLI and the benches do this; in code,
    pass your own). With ``tokenizer`` None the batch is a stand-in, to check the options before
    any text is read."""
    from .options import apply_recipe
    from .passes.registry import METHODS, build

    prune = apply_recipe(options)[1].get("prune")
    prune = {"method": prune} if isinstance(prune, str) else prune
    if not isinstance(prune, dict) or "calibration" in prune or prune.get("method") not in METHODS["prune"]:
        return options
    params = {k: v for k, v in prune.items() if k != "method"}
    probe = build("prune", prune["method"], {**params, "calibration": [torch.zeros(1, 1, dtype=torch.long)]})
    if not probe.needs_calibration():
        return options
    batches = calibration_batches(tokenizer, length) if tokenizer is not None else probe.calibration
    return {**options, "prune": {**prune, "calibration": batches}}


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
        for doc, windows in progress(docs.items(), total=len(docs), desc=name, unit="doc"):
            nll = sum(F.cross_entropy(forward(w[None])[0, :-1].float(), w[1:], reduction="sum").item()
                      for w in windows)
            result.ppl[doc] = math.exp(nll / (windows.numel() - windows.shape[0]))
    result.ppl_dense = dict(dense) if dense is not None else dict(result.ppl)
    return result


def logits_forward(model: Callable) -> Callable:
    """``ids -> logits`` through ``model`` (a model or its compiled forward) without a cache."""
    return lambda ids: model(input_ids=ids, use_cache=False).logits


# ---------------------------------------------------------------------------------------------
# MiniLM embeddings (encoder token dropping / pruning)
# ---------------------------------------------------------------------------------------------

MAX_SENTENCE_TOKENS = 128


def sentences(text: str, tokenizer: Any, min_tokens: int = 8) -> list[torch.Tensor]:
    """The sentences of ``text`` as token ids (1, T), T in [min_tokens, MAX_SENTENCE_TOKENS]
    ([CLS] and [SEP] included; longer sentences are cut)."""
    import re

    out = []
    for sentence in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
        ids = tokenizer(sentence, return_tensors="pt", truncation=True, max_length=MAX_SENTENCE_TOKENS).input_ids
        if ids.shape[1] >= min_tokens:
            out.append(ids)
    return out


def mean_pooled(model: Callable) -> Callable:
    """``ids (1, T) -> embedding (1, D)``: sentence-transformers' mean pooling over the attention
    mask, then L2 normalization, as all-MiniLM-L6-v2 is used. The pooling is part of the function,
    so a compiled version pools (size-weighted) over whatever tokens the passes leave."""

    def embed(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (1, T, D)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (1, T, 1)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # (1, D)
        return F.normalize(pooled, dim=-1)

    return embed


def truncated_sentences(embed: Callable, fraction: float) -> Callable:
    """The naive baseline of the MiniLM protocol: ``embed`` over the first round(T * fraction) - 1
    tokens of each sentence and its final [SEP]."""

    def run(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        keep = max(2, round(input_ids.shape[1] * fraction))
        ids = torch.cat([input_ids[:, :keep - 1], input_ids[:, -1:]], dim=1)  # (1, keep)
        return embed(ids, torch.ones_like(ids))

    return run


@dataclass
class EmbeddingResult:
    """Cosine similarity of one setting's sentence embeddings to dense ones."""

    name: str
    cosines: list[float] = field(default_factory=list)
    token_fraction: float = 1.0  # tokens the layers process, relative to dense (mean over layers)

    @property
    def mean_cosine(self) -> float:
        return sum(self.cosines) / len(self.cosines)

    def to_dict(self) -> dict:
        return {"name": self.name, "mean_cosine": self.mean_cosine, "min_cosine": min(self.cosines),
                "sentences": len(self.cosines), "token_fraction": self.token_fraction}


def minilm_cosine(name: str, embed: Callable, dense_embeddings: list[torch.Tensor], ids: list[torch.Tensor],
                  token_fraction: float = 1.0) -> EmbeddingResult:
    """The MiniLM protocol for one setting: ``embed(input_ids, attention_mask) -> (1, D)`` on every
    sentence, against the dense embeddings of the same sentences."""
    result = EmbeddingResult(name, token_fraction=token_fraction)
    with torch.no_grad():
        for sentence, dense in progress(zip(ids, dense_embeddings), total=len(ids), desc=name, unit="sentence"):
            embedding = embed(sentence, torch.ones_like(sentence))
            result.cosines.append(F.cosine_similarity(embedding, dense, dim=-1).item())
    return result
