"""The KV-cache eviction pass (compile side): where a site's cache update ``cat([past, new],
dim=-2)`` is handed back to the cache (a graph output), the graph returns ``evict_kv(q, cat_k,
cat_v)`` instead. The attention itself still reads every token of this call; the cache the next
call sees holds only the budget.

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

import operator

import torch
import torch.fx as fx

from ..._torch_internals import run_on_examples
from ...analysis import AttentionSite, GraphAnalysis, example_value
from ...report import PassResult
from ...state import StateSlot, add_state, add_state_input
from ..registry import method_of, params_of, register_pass
from ..toolkit import inserting_after_all
from .evict import evict_kv
from .scoring import KVConfig


def _cache_sites(analysis: GraphAnalysis) -> list[AttentionSite]:
    sites = [s for s in analysis.attention if s.has_cache]
    static = [s.layer for s in sites if s.k_cache.kind != "concat"]
    if static:
        raise ValueError(f"layers {static} use a StaticCache (index_copy_ into a preallocated buffer): eviction "
                         "needs a cache whose length can shrink; use DynamicCache (HF's default)")
    return sites


def _rewrite_site(gm: fx.GraphModule, site: AttentionSite, config: KVConfig, num_layers: int, prefill: bool,
                  kernels: str) -> None:
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
    kwargs = dict(method=method_of(config)[1], params=params_of(config), layer=site.layer, num_layers=num_layers,
                  prefill=prefill, scale=site.scale, causal=bool(site.causal), kernels=kernels)
    values = run_on_examples(evict_kv, *(example_value(a) for a in args), **kwargs)
    with inserting_after_all(graph, [site.query, k_cat, v_cat, site.node]):
        evicted = graph.call_function(evict_kv, args, kwargs)
        outputs = [graph.call_function(operator.getitem, (evicted, i)) for i in range(3 if config.STATE_SIZE else 2)]
    for node, value in zip([evicted, *outputs], (values, *values)):
        node.meta["example_value"] = value
    k_cat.replace_all_uses_with(outputs[0], delete_user_cb=lambda user: user.op == "output")
    v_cat.replace_all_uses_with(outputs[1], delete_user_cb=lambda user: user.op == "output")
    if config.STATE_SIZE and config.decode:
        owner_input = site.k_cache.input if state_in is not None else None
        add_state(gm, StateSlot(f"kv_state_layer_{site.layer}", state_in, owner_input, outputs[2], outputs[0]))


@register_pass(KVConfig)
def kv_eviction_pass(gm: fx.GraphModule, analysis: GraphAnalysis, config: KVConfig, ctx) -> PassResult:
    """Rewrite every cached attention site of ``gm`` to evict with the config's scorer."""
    result = PassResult(method=method_of(config)[1], family="kv")
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
        _rewrite_site(gm, site, config, num_layers, prefill, ctx.kernels)
        length = cached[2]
        kept = config.kept_tokens(prefill, site.layer, num_layers, length, length - example_value(site.query).shape[2])
        kind = "prefill eviction" if prefill else "decode eviction"
        result.count(kind)
        result.sites[name] = f"{kind}: cache {length} -> {kept} tokens"
        if isinstance(length, int) and isinstance(kept, int) and isinstance(per_token, int):
            bytes_before += per_token * length
            bytes_after += per_token * kept
        else:
            symbolic = True
    if result.rewrites and not symbolic:
        result.kv_cache_bytes = {"before": bytes_before, "after": bytes_after}
    return result
