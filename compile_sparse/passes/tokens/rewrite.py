"""The token-reduction pass (compile side). At each layer ``L`` of the schedule the graph is cut:
the method's selector reads the attention of layer ``L - 1`` and returns which tokens go on (and,
for merging methods, how the others fold into them); every per-token tensor that layers ``L..``
read from before the cut is then gathered (or merged) along its token axis, so the later layers
compute, and cache, only the kept tokens.

Which tensors are per-token, and along which axis, comes from ``analysis.token_axes``, which
follows the token axis from the inputs through reshapes, transposes, projections and attention.
The pass refuses a graph, with the reason in its result, when anything after a cut reads tokens
through an op that trace does not understand, when a graph output or a slice after the cut needs
tokens that were dropped, or when the batch holds more than one sequence (each would keep
different tokens).

Rewrites per cut: one ``select_tokens`` call (after the scoring attention), one ``reduce_tokens``
per tensor crossing the cut, the token size of every view / reshape / expand after the cut, and
for merging methods size-weighted token reductions (mean pooling) and, optionally, ToMe's
proportional attention (log token sizes added to the attention logits).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ..._torch_internals import propagate_shapes
from ...analysis import AttentionSite, GraphAnalysis, TokenAxes, example_value, is_parameter, token_axes
from ...analysis.ops import layer_index, op_name, shape_of, static_size
from ...report import PassResult
from ..registry import method_of, params_of, register_pass
from ..toolkit import SIZE_OPS, apply_size_rewrites, size_args
from .schedule import per_layer
from .select import TokenConfig, reduce_tokens, select_tokens, size_bias, weight_tokens


class Refused(Exception):
    """The graph cannot be reduced safely; the message says why (shown in explain, and warned about)."""


class Inapplicable(Refused):
    """A graph the method does not apply to: a decode step, a call over a past cache, a graph with
    no attention (token reduction reduces prompts). Leaving it alone is what the method does: no warning."""


@dataclass
class _Cut:
    layer: int
    site: AttentionSite  # the scoring attention, layer - 1
    kept: int
    select: fx.Node | None = None
    index: fx.Node | None = None
    merge: fx.Node | None = None
    sizes: fx.Node | None = None


def _regions(gm: fx.GraphModule, layers: tuple[int, ...]) -> dict[fx.Node, int]:
    """Per node, how many cuts lie before it: the highest cut whose layer the node belongs to or
    reads from (0 before the first cut)."""
    region: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        layer = layer_index(node, None) if node.op in ("call_function", "call_method") else None
        own = sum(1 for cut in layers if layer is not None and layer >= cut)
        region[node] = max([own] + [region[n] for n in node.all_input_nodes])
    return region


def _check_selection(node: fx.Node, selection: tuple[int, Any], causal: bool, last_kept: int) -> None:
    """Raise Refused unless a slice after a cut takes tokens every cut keeps: the last ones (decoder)
    or the first (the [CLS] token of an encoder)."""
    _, index = selection
    if causal:
        start = index if isinstance(index, int) else index.start
        if isinstance(index, slice) and (index.stop is not None or index.step not in (None, 1)):
            start = None
        if isinstance(start, int) and start < 0 and -start <= last_kept:
            return
        raise Refused(f"{node.name} takes tokens [{index}] after a cut; only the last {last_kept} are always "
                      "kept (the graph must only need the last positions: logits_to_keep=1)")
    if index == 0 or (isinstance(index, slice) and index.start in (None, 0) and index.stop == 1):
        return
    raise Refused(f"{node.name} takes tokens [{index}] after a cut; only the first ([CLS]) is always kept")


def _plan(gm: fx.GraphModule, analysis: GraphAnalysis, config: TokenConfig, causal: bool,
          last_kept: int) -> tuple[list[_Cut], TokenAxes, dict[fx.Node, int], int]:
    """Check the graph and the schedule; returns the cuts, the token axes, the regions and the length."""
    sites = {s.layer: s for s in analysis.attention}
    if not sites:
        raise Inapplicable("no attention found in this graph")
    for skipped in analysis.skipped:
        if skipped.kind == "attention":
            raise Refused(f"attention {skipped.node} was not understood ({skipped.reason}); a cut could miss it")
    if len(sites) != len(analysis.attention) or sorted(sites) != list(range(len(sites))):
        raise Refused(f"attention layers {sorted(s.layer for s in analysis.attention)} are not one per layer 0..n-1")
    if config.layers[-1] >= len(sites):
        raise ValueError(f"layers {list(config.layers)} reach past the model's {len(sites)} layers")
    first = sites[0]
    batch = shape_of(first.query)[0]
    for site in sites.values():
        if site.q_len != first.q_len or site.kv_len != first.q_len:
            raise Inapplicable(f"layer {site.layer} attends {site.q_len} queries to {site.kv_len} keys: token dropping "
                          "applies to a whole prompt with no past cache (a prefill), not to a decode step")
    if not isinstance(batch, int) or batch != 1:
        raise Refused(f"batch of {batch} sequences: each would keep different tokens; run one sequence at a time")
    length = static_size(shape_of(first.query)[2])
    if not isinstance(length, int):
        raise Refused(f"the prompt length is symbolic ({length}: Dynamo compiles one graph for every length once it "
                      "has seen two): dropping tokens rewrites every size after a cut, which needs a static length; "
                      "compile with dynamic=False (one graph per prompt length, up to Dynamo's recompile limit)")
    for site in sites.values():
        if site.causal is not causal:
            kind = "causal (decoder)" if causal else "bidirectional (encoder)"
            raise Refused(f"layer {site.layer} attention is not {kind}; this method is for {kind} models")
    cuts = [_Cut(layer, sites[layer - 1], max(min(length, last_kept), config.kept(i, length)))
            for i, layer in enumerate(config.layers)]
    axes = token_axes(gm, length)
    region = _regions(gm, config.layers)
    outputs = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    cache_outputs = {slot.output for s in sites.values() for slot in (s.k_cache, s.v_cache) if slot is not None}
    for node in gm.graph.nodes:
        r = region[node]
        if r == 0 or node.op == "output":
            continue
        if axes.axes[node] is None:
            raise Refused(f"{node.name} ({op_name(node)}) reads tokens in a way the token-axis trace does not follow")
        for source in node.all_input_nodes:
            value = example_value(source)
            if region[source] < r and axes.axes[source] == () and isinstance(value, torch.Tensor) \
                    and source.op == "call_function" and length in value.shape and not is_parameter(source):
                raise Refused(f"{source.name} {tuple(value.shape)} has an axis as long as the sequence that the "
                              "token-axis trace did not reach")
        if node in axes.selections:
            _check_selection(node, axes.selections[node], causal, last_kept)
        if node in axes.reductions and (causal or op_name(node) not in ("sum", "mean")):
            raise Refused(f"{node.name} ({op_name(node)}) reduces over tokens after a cut: the result would change")
        if op_name(node) in SIZE_OPS and axes.axes[node]:
            args, _ = size_args(node)
            for axis in axes.axes[node]:
                if axis >= len(args) or args[axis] not in (length, -1):
                    raise Refused(f"{node.name} sizes {args}: the token axis {axis} is not given as {length} or -1")
        if node in outputs.all_input_nodes and axes.axes[node] and causal and node not in cache_outputs:
            raise Refused(f"the graph returns {node.name} with one value per token (logits for every position?): "
                          "dropping tokens would change its shape; compile a forward that keeps only the last "
                          "position (logits_to_keep=1)")
    return cuts, axes, region, length


def _insert_selects(gm: fx.GraphModule, cuts: list[_Cut], config: TokenConfig) -> None:
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    previous = None
    for cut in cuts:
        site = cut.site
        probs = site.node if site.form == "matmul_softmax" else None
        mask = site.mask if site.form == "sdpa" else None
        args = (site.query, site.key, probs, mask, previous.sizes if previous else None)
        kwargs = dict(method=method_of(config)[1], params=params_of(config), kept=cut.kept, scale=site.scale,
                      causal=bool(site.causal), key_transposed=site.form == "matmul_softmax")
        after = max([n for n in (*args, site.node) if isinstance(n, fx.Node)], key=order.__getitem__)
        with graph.inserting_after(after):
            selected = graph.call_function(select_tokens, args, kwargs)
        with graph.inserting_after(selected):  # example values come from propagate_shapes, after every cut
            parts = [graph.call_function(operator.getitem, (selected, i)) for i in range(3 if config.MERGES else 2)]
        cut.select, cut.index, cut.sizes = selected, parts[0], parts[1]
        cut.merge = parts[2] if config.MERGES else None
        order = {n: i for i, n in enumerate(graph.nodes)}
        previous = cut


def _is_feature(node: fx.Node, axes: tuple[int, ...], hidden: int) -> bool:
    """Token features (hidden states) are merged; everything else per token (positions, masks,
    RoPE tables) takes the value of the token that stands for the merged group."""
    value = example_value(node)
    return value.is_floating_point() and len(axes) == 1 and value.shape[-1] == hidden and axes[0] != value.dim() - 1


def _insert_reductions(gm: fx.GraphModule, cuts: list[_Cut], axes: TokenAxes, region: dict[fx.Node, int]) -> int:
    """Route every tensor that crosses a cut through reduce_tokens (one chain per tensor and
    region, shared by its users there). Returns the number of reduce_tokens calls."""
    graph = gm.graph
    hidden = cuts[0].site.q.in_features
    chains: dict[tuple[fx.Node, int], fx.Node] = {}
    count = 0
    made = {n for n in graph.nodes if region.get(n, 0) and axes.axes.get(n)
            and not any(axes.axes.get(i) for i in n.all_input_nodes)}
    for node in list(graph.nodes):
        r = region.get(node, 0)
        if r == 0 or node.op == "output":
            continue
        if node in made:
            # a per-token tensor made after a cut from no tokens (a causal buffer sliced to the
            # sequence length, arange(T)): it still has every input token; reduce it through the cuts
            users, current = list(node.users), node
            for cut in cuts[:r]:
                with graph.inserting_after(current):
                    current = graph.call_function(reduce_tokens, (current, cut.index, None, axes.axes[node]))
                count += 1
            for user in users:
                user.replace_input_with(node, current)
        for source in list(node.all_input_nodes):
            source_axes = axes.axes.get(source)
            if region.get(source, r) >= r or not source_axes:
                continue
            if (source, r) not in chains:
                current = source
                feature = _is_feature(source, source_axes, hidden)
                with graph.inserting_before(node):
                    for cut in cuts[region[source]:r]:
                        merge = cut.merge if feature else None
                        current = graph.call_function(reduce_tokens, (current, cut.index, merge, source_axes))
                        count += 1
                chains[(source, r)] = current
            node.replace_input_with(source, chains[(source, r)])
    return count


def _resize(gm: fx.GraphModule, cuts: list[_Cut], axes: TokenAxes, region: dict[fx.Node, int], length: int) -> int:
    rewrites = []
    for node in gm.graph.nodes:
        r = region.get(node, 0)
        if r and op_name(node) in SIZE_OPS and axes.axes.get(node):
            args, _ = size_args(node)
            new = [cuts[r - 1].kept if i in axes.axes[node] and a == length else a for i, a in enumerate(args)]
            if new != args:
                rewrites.append((node, new))
    apply_size_rewrites(rewrites)
    return len(rewrites)


def _weigh_reductions(gm: fx.GraphModule, cuts: list[_Cut], axes: TokenAxes, region: dict[fx.Node, int]) -> int:
    """Sums and means over tokens after a cut count every input token once (mean pooling stays a
    mean over the input's tokens)."""
    count = 0
    for node, axis in list(axes.reductions.items()):
        r = region.get(node, 0)
        if r == 0:
            continue
        source = node.args[0]
        with gm.graph.inserting_before(node):
            weighted = gm.graph.call_function(weight_tokens, (source, cuts[r - 1].sizes, axis, op_name(node) == "mean"))
        node.replace_input_with(source, weighted)
        count += 1
    return count


def _sdpa_mask(node: fx.Node) -> Any:
    """The attn_mask an SDPA call reads now (after the cuts rerouted its inputs)."""
    return node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")


def _proportional_attention(gm: fx.GraphModule, analysis: GraphAnalysis, cuts: list[_Cut],
                            region: dict[fx.Node, int]) -> int:
    """Add log token sizes to the attention logits of every layer after a cut (ToMe)."""
    count = 0
    for site in analysis.attention:
        r = region[site.node]
        if r == 0:
            continue
        sizes = cuts[r - 1].sizes
        dtype = example_value(site.query).dtype
        with gm.graph.inserting_before(site.node):
            if site.form == "sdpa":
                bias = gm.graph.call_function(size_bias, (_sdpa_mask(site.node), sizes, dtype))
                site.node.kwargs = {**site.node.kwargs, "attn_mask": bias}
                if len(site.node.args) > 3:
                    site.node.args = site.node.args[:3]
            else:
                scores = site.node.args[0]
                bias = gm.graph.call_function(size_bias, (None, sizes, dtype))
                site.node.replace_input_with(scores, gm.graph.call_function(operator.add, (scores, bias)))
        count += 1
    return count


@register_pass(TokenConfig)
def token_reduction_pass(gm: fx.GraphModule, analysis: GraphAnalysis, config: TokenConfig, ctx) -> PassResult:
    """Cut ``gm`` at ``config.layers`` and reduce the tokens with the config's selector (see the
    module docstring)."""
    result = PassResult(method=method_of(config)[1], family="tokens")
    try:
        cuts, axes, region, length = _plan(gm, analysis, config, config.CAUSAL, config.last_kept())
    except Inapplicable as reason:
        result.sites["graph"] = f"not applied: {reason}"
        return result
    except Refused as reason:
        result.refuse("graph", str(reason), verb="not applied")
        return result
    _insert_selects(gm, cuts, config)
    result.rewrites["cuts"] = len(cuts)
    result.rewrites["reduced tensors"] = _insert_reductions(gm, cuts, axes, region)
    for cut in cuts:  # a later cut scores with the mask its attention now reads: reduced by the earlier cuts
        if cut.site.form == "sdpa":
            cut.select.update_arg(3, _sdpa_mask(cut.site.node))
    result.rewrites["resized views"] = _resize(gm, cuts, axes, region, length)
    if config.MERGES:
        result.rewrites["size-weighted reductions"] = _weigh_reductions(gm, cuts, axes, region)
    if config.PROPORTIONAL:
        result.rewrites["proportional attention"] = _proportional_attention(gm, analysis, cuts, region)
    gm.graph.lint()
    gm.recompile()
    propagate_shapes(gm)
    for cut in cuts:
        result.sites[f"layer {cut.layer}"] = (f"tokens {length} -> {cut.kept} from here on "
                                              f"(scored by layer {cut.site.layer} attention)")
    kept = per_layer(config.layers, [cut.kept for cut in cuts], length, len(analysis.attention))
    result.sites["tokens per layer"] = " ".join(map(str, kept))
    per_token = [s.kv_bytes_per_token() for s in sorted(analysis.attention, key=lambda s: s.layer)]
    if any(per_token):
        result.kv_cache_bytes = {"before": sum(p * length for p in per_token),
                                 "after": sum(p * k for p, k in zip(per_token, kept))}
    return result

