"""The shared base of the KV-cache eviction methods: budgets, selection, gather, decode state.

A method is a config (a ``KVConfig`` subclass) and a scorer, registered with
``@kv_method("snapkv", SnapKVConfig)``. The scorer sees one attention site's new queries and its
whole cache (past, then the new tokens) and returns one score per cached token and KV head; this
base keeps the top ``budget`` tokens per sequence and KV head, in their original order, and gathers
K, V and the scorer's state.

The rewrite: where a site's cache update ``cat([past, new], dim=-2)`` is handed back to the cache
(a graph output), the graph now returns ``evict_kv(q, cat_k, cat_v)`` instead. The attention itself
still reads every token of this call; the cache the next call sees holds only the budget.

- Prefill (the cache starts empty): a prompt of T tokens leaves ``budget(layer, T)`` tokens per
  layer, ``max(1, floor(T * (1 - compression_ratio)))`` unless the method allocates per layer.
- Decode (the graph reads a past cache of P tokens), for methods with a decode rule and
  ``decode=True``: after n new tokens the cache again holds P tokens, so its size is stable and
  decode compiles once (at compression_ratio 0 nothing is evicted: the cache grows as dense).
  Scores that persist across steps (H2O, HitKV) travel as state the backend owns
  (compile_sparse.state), reset by every prefill.

Positions: keys are cached after RoPE, so eviction keeps them valid; a later forward must pass
the true ``position_ids`` (HF ``generate`` does; see docs/kv_eviction.md).
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, ClassVar

import torch
import torch.fx as fx

from .._torch_internals import run_on_examples
from ..analysis import AttentionSite, GraphAnalysis, example_value
from ..codegen import ops
from ..state import StateSlot, add_state, add_state_input
from . import PassResult, register

SCORE_CHUNK = 256  # queries per chunk when scoring against all keys: at most (B, H, 256, T) at once


@dataclass
class KVConfig:
    """Common parameters. ``compression_ratio``: the fraction of the prompt's tokens evicted at
    prefill (0.75 keeps 25%). ``decode``: keep the cache at that size while generating (only for
    methods with a decode rule)."""

    compression_ratio: float = 0.0
    decode: bool = False

    SUPPORTS_DECODE: ClassVar[bool] = False
    STATE_SIZE: ClassVar[int] = 0  # floats of state per cached token and KV head (0: stateless)

    def __post_init__(self) -> None:
        ratio = self.compression_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise ValueError(f"compression_ratio must be a number in [0, 1), got {ratio!r}")
        check_bool(self, "decode")
        if self.decode and not self.SUPPORTS_DECODE:
            raise ValueError(f"{type(self).__name__} has no decode rule (it scores the prompt only); "
                             f"decode must be False, got {self.decode!r}")

    def kept_tokens(self, prefill: bool, layer: int, num_layers: int, length: Any, past_len: Any) -> Any:
        """Tokens a layer keeps of ``length`` cached ones after a call over ``past_len`` of them: the
        prompt's budget on a prefill; in decode the cache stays at its size (at compression_ratio 0
        it keeps everything)."""
        if prefill:
            return self.budget(layer, num_layers, length)
        return past_len if self.compression_ratio > 0 else length

    def budget(self, layer: int, num_layers: int, length: Any) -> Any:
        """Tokens a layer keeps of a ``length``-token prompt: max(1, floor(length * (1 - ratio)))."""
        keep = Fraction(1 - self.compression_ratio).limit_denominator(1 << 20)
        return max(1, (length * keep.numerator) // keep.denominator)


def check_int(config: object, *names: str, minimum: int = 1) -> None:
    """Raise a ValueError naming the bad value unless every field in ``names`` is an int >= ``minimum``."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_bool(config: object, *names: str) -> None:
    """Raise a ValueError naming the bad value unless every field in ``names`` is True or False."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")


KERNELS_META = "compile_sparse_kernels"  # gm.meta key: options["kernels"], set by the backend


@dataclass
class ScoreInputs:
    """What a scorer sees at one attention site.

    query: (B, H, n, D), the n new tokens' queries after RoPE. keys: (B, Hkv, P + n, D), the past
    cache then the new keys. state: (B, Hkv, P, STATE_SIZE) kept from earlier calls (None on a
    prefill or for stateless methods).
    """

    query: torch.Tensor
    keys: torch.Tensor
    scale: float
    causal: bool
    past_len: Any
    state: torch.Tensor | None
    kernels: str = "auto"  # options["kernels"]: "auto" (Triton on CUDA) or "interpret"

    @property
    def group_size(self) -> int:
        return self.query.shape[1] // self.keys.shape[1]


# scorer(inputs, config) -> (scores (B, Hkv, P + n), new state (B, Hkv, P + n, STATE_SIZE) or None)
Scorer = Callable[[ScoreInputs, Any], tuple[torch.Tensor, torch.Tensor | None]]
SCORERS: dict[str, tuple[type, Scorer]] = {}


def attention_probs(inputs: ScoreInputs, start: Any, stop: Any) -> torch.Tensor:
    """Softmax attention of new queries [start, stop) over every cached key, in fp32, with the
    causal mask aligned bottom-right (query i of n sees keys up to P + i): (B, Hkv, G, stop - start, P + n).
    Keys no query of the chunk can see are not computed (their probability is 0)."""
    q = inputs.query[:, :, start:stop].float()  # (B, H, c, D)
    b, h, c, d = q.shape
    keys = inputs.keys.float()
    hkv, length = keys.shape[1], keys.shape[2]
    visible = inputs.past_len + stop if inputs.causal else length
    q = q.reshape(b, hkv, h // hkv * c, d)  # (B, Hkv, G * c, D): one matmul per KV head, keys not repeated
    logits = torch.matmul(q, keys[:, :, :visible].transpose(-1, -2)) * inputs.scale  # (B, Hkv, G * c, V)
    logits = logits.view(b, hkv, h // hkv, c, visible)  # (B, Hkv, G, c, V)
    if inputs.causal:
        q_pos = torch.arange(c, device=q.device) + (inputs.past_len + start)  # (c,)
        k_pos = torch.arange(visible, device=q.device)  # (V,)
        logits = logits.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.nn.functional.pad(probs, (0, length - visible))  # (B, Hkv, G, c, P + n)


def query_chunks(n: Any) -> list[tuple[int, Any]]:
    """[start, stop) ranges of at most SCORE_CHUNK queries covering n."""
    return [(start, min(start + SCORE_CHUNK, n)) for start in range(0, n, SCORE_CHUNK)]


def observers(inputs: ScoreInputs) -> torch.Tensor:
    """How many of this call's queries see each cached key: (P + n,) in fp32."""
    n, length = inputs.query.shape[2], inputs.keys.shape[2]
    k_pos = torch.arange(length, device=inputs.keys.device, dtype=torch.float32)
    if not inputs.causal:
        return torch.full((length,), float(n), device=inputs.keys.device)
    return (inputs.past_len + n - k_pos).clamp(min=0, max=n)  # key j is seen by queries P + i >= j


def column_sums(inputs: ScoreInputs, start: Any) -> torch.Tensor:
    """Attention each cached key gets from the new queries [start, n), summed over them and over
    the group: (B, Hkv, P + n) fp32. On CUDA (or with options["kernels"] = "interpret") the Triton
    key-score kernel computes it without a queries x keys matrix; on CPU, chunked torch code that
    Inductor compiles."""
    if inputs.query.is_cuda or inputs.kernels == "interpret":
        return ops.attention_key_scores(inputs.query, inputs.keys, inputs.scale, inputs.causal, start,
                                        interpret=inputs.kernels == "interpret")
    return per_key_totals(inputs, start, lambda probs: probs.sum(dim=(2, 3)))


def per_key_totals(inputs: ScoreInputs, start: Any, per_query: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``per_query`` of the attention probabilities of new queries [start, n), chunk by chunk,
    summed: (B, Hkv, P + n) fp32."""
    b, hkv, length, _ = inputs.keys.shape
    total = inputs.keys.new_zeros((b, hkv, length), dtype=torch.float32)
    for first, stop in query_chunks(inputs.query.shape[2] - start):
        total = total + per_query(attention_probs(inputs, start + first, start + stop))
    return total


def accumulate(inputs: ScoreInputs, per_query: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Running (sum, count) per cached token and KV head: the state of H2O and HitKV.

    ``per_query`` maps attention probabilities (B, Hkv, G, c, T) to per-key amounts summed over
    those queries and the group (B, Hkv, T); None sums the probabilities (``column_sums``).
    Returns (B, Hkv, P + n, 2): [sum, queries seen by].
    """
    b, hkv, length, _ = inputs.keys.shape
    total = column_sums(inputs, 0) if per_query is None else per_key_totals(inputs, 0, per_query)
    count = observers(inputs) * inputs.group_size  # (P + n,)
    new = torch.stack([total, count.expand(b, hkv, length)], dim=-1)  # (B, Hkv, P + n, 2)
    if inputs.state is None:
        return new
    past = torch.nn.functional.pad(inputs.state, (0, 0, 0, length - inputs.state.shape[2]))  # (B, Hkv, P + n, 2)
    return past + new


def protect_recent(scores: torch.Tensor, window: int) -> torch.Tensor:
    """Scores (B, Hkv, T) with the last ``window`` tokens raised above every other, newer above
    older: they are kept first, and a budget smaller than the window keeps the newest."""
    if window == 0:
        return scores
    length = scores.shape[-1]
    position = torch.arange(length, device=scores.device, dtype=scores.dtype)  # (T,)
    raised = scores.amax(dim=-1, keepdim=True) + 1 + position / length  # (B, Hkv, T)
    return torch.where(position >= length - window, raised, scores)


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
    config_cls, scorer = SCORERS[method]
    config = config_cls(**params)
    n, length = query.shape[2], keys.shape[2]
    past_len = length - n
    inputs = ScoreInputs(query, keys, scale, causal, past_len, state, kernels)
    scores, new_state = scorer(inputs, config)
    kept = config.kept_tokens(prefill, layer, num_layers, length, past_len)
    if kept == length - 1:  # one token goes (a decode step): skip the lowest, no sort needed
        position = torch.arange(kept, device=keys.device)  # (K,)
        index = position + (position >= scores.argmin(dim=-1, keepdim=True))  # (B, Hkv, K), in cache order
    else:
        index = scores.topk(kept, dim=-1).indices.sort(dim=-1).values  # (B, Hkv, K), in cache order
    kept_state = gather_tokens(new_state, index) if new_state is not None else None
    return gather_tokens(keys, index), gather_tokens(values, index), kept_state


# ---------------------------------------------------------------------------------------------
# The graph rewrite
# ---------------------------------------------------------------------------------------------


def _cache_sites(analysis: GraphAnalysis) -> list[AttentionSite]:
    sites = [s for s in analysis.attention if s.has_cache]
    static = [s.layer for s in sites if s.k_cache.kind != "concat"]
    if static:
        raise ValueError(f"layers {static} use a StaticCache (index_copy_ into a preallocated buffer): eviction "
                         "needs a cache whose length can shrink; use DynamicCache (HF's default)")
    return sites


def _after_all(graph: fx.Graph, nodes: list[fx.Node]) -> fx.Node:
    order = {n: i for i, n in enumerate(graph.nodes)}
    return max(nodes, key=order.__getitem__)


def _rewrite_site(gm: fx.GraphModule, site: AttentionSite, config: KVConfig, method: str, num_layers: int,
                  prefill: bool) -> None:
    """Route the site's cache outputs (and, for stateful methods, its state) through evict_kv."""
    graph = gm.graph
    k_cat, v_cat = site.k_cache.update, site.v_cache.update
    if site.k_cache.output is None or site.v_cache.output is None:
        raise ValueError(f"layer {site.layer}: the cache update is not handed back as a graph output")
    state_in = None
    if config.STATE_SIZE and not prefill:
        past = example_value(site.k_cache.input)  # (B, Hkv, P, D)
        example = past.new_zeros((*past.shape[:3], config.STATE_SIZE), dtype=torch.float32)  # (B, Hkv, P, S)
        state_in = add_state_input(gm, f"kv_state_layer_{site.layer}", example)
    args = (site.query, k_cat, v_cat) + ((state_in,) if state_in is not None else ())
    kwargs = dict(method=method, params=dataclasses.asdict(config), layer=site.layer, num_layers=num_layers,
                  prefill=prefill, scale=site.scale, causal=bool(site.causal), kernels=gm.meta.get(KERNELS_META, "auto"))
    values = run_on_examples(evict_kv, *(example_value(a) for a in args), **kwargs)
    with graph.inserting_before(_after_all(graph, [site.query, k_cat, v_cat, site.node]).next):
        evicted = graph.call_function(evict_kv, args, kwargs)
        outputs = [graph.call_function(operator.getitem, (evicted, i)) for i in range(3 if config.STATE_SIZE else 2)]
    for node, value in zip([evicted, *outputs], (values, *values)):
        node.meta["example_value"] = value
    k_cat.replace_all_uses_with(outputs[0], delete_user_cb=lambda user: user.op == "output")
    v_cat.replace_all_uses_with(outputs[1], delete_user_cb=lambda user: user.op == "output")
    if config.STATE_SIZE and config.decode:
        owner_input = site.k_cache.input if state_in is not None else None
        add_state(gm, StateSlot(f"kv_state_layer_{site.layer}", state_in, owner_input, outputs[2], outputs[0]))


def kv_eviction_pass(method: str, gm: fx.GraphModule, analysis: GraphAnalysis, config: KVConfig) -> PassResult:
    """Rewrite every cached attention site of ``gm`` to evict with ``method``'s scorer."""
    result = PassResult(method=method, family="kv")
    sites = _cache_sites(analysis)
    for skipped in analysis.skipped:
        if skipped.kind == "attention":
            result.sites[skipped.node] = f"not rewritten (skipped by the analysis: {skipped.reason})"
    if not sites:
        result.sites["graph"] = "no attention over a KV cache in this graph (use_cache off?): nothing to evict"
        return result
    num_layers = max(s.layer for s in sites) + 1
    bytes_before = bytes_after = 0
    symbolic = False
    for site in sites:
        prefill = site.k_cache.input.op != "placeholder"
        name = f"layer {site.layer} attention"
        cached = example_value(site.k_cache.update).shape  # (B, Hkv, P + n, D)
        per_token = site.kv_bytes_per_token() * cached[0]
        if not prefill and not config.decode:
            result.sites[name] = "decode: the cache grows (decode eviction is off)"
            continue
        _rewrite_site(gm, site, config, method, num_layers, prefill)
        length = cached[2]
        kept = config.kept_tokens(prefill, site.layer, num_layers, length, length - example_value(site.query).shape[2])
        kind = "prefill eviction" if prefill else "decode eviction"
        result.rewrites[kind] = result.rewrites.get(kind, 0) + 1
        result.sites[name] = f"{kind}: cache {length} -> {kept} tokens"
        if isinstance(length, int) and isinstance(kept, int) and isinstance(per_token, int):
            bytes_before += per_token * length
            bytes_after += per_token * kept
        else:
            symbolic = True
    if result.rewrites and not symbolic:
        result.kv_cache_bytes = {"before": bytes_before, "after": bytes_after}
    return result


def kv_method(name: str, config: type[KVConfig]) -> Callable[[Scorer], Scorer]:
    """Decorator: register ``scorer`` as KV method ``name`` configured by ``config``."""

    def add(scorer: Scorer) -> Scorer:
        SCORERS[name] = (config, scorer)

        def apply(gm: fx.GraphModule, analysis: GraphAnalysis, cfg: KVConfig) -> PassResult:
            return kv_eviction_pass(name, gm, analysis, cfg)

        register("kv", name, config)(apply)
        return scorer

    return add


def pool_scores(scores: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Average each token's score with its neighbours (SnapKV's clustering): (B, Hkv, T) -> same."""
    if kernel_size == 1:
        return scores
    b, h, t = scores.shape
    pooled = torch.nn.functional.avg_pool1d(scores.reshape(b * h, 1, t), kernel_size, stride=1,
                                            padding=kernel_size // 2, count_include_pad=False)  # (B*Hkv, 1, T)
    return pooled.reshape(b, h, t)


def window_scores(inputs: ScoreInputs, window: int) -> torch.Tensor:
    """Mean attention the last ``window`` new queries pay each key, averaged over the group: (B, Hkv, P + n)."""
    n = inputs.query.shape[2]
    seen = min(window, n)
    return column_sums(inputs, n - seen) / (seen * inputs.group_size)

