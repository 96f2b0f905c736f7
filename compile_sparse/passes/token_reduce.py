"""The shared base of the token-dropping and token-merging methods: schedule, cut, gather, sizes.

A method is a config (a ``TokenScheduleConfig`` subclass) and a selector, registered with
``@token_method("lazyllm", LazyLLMConfig, causal=True)``. At each layer ``L`` of the schedule the
graph is cut: the selector reads the attention of layer ``L - 1`` and returns which tokens go on
(and, for merging methods, how the others fold into them); every per-token tensor that layers
``L..`` read from before the cut is then gathered (or merged) along its token axis, so the later
layers compute, and cache, only the kept tokens.

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

import dataclasses
import operator
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.fx as fx

from .._torch_internals import propagate_shapes
from ..analysis import (AttentionSite, GraphAnalysis, TokenAxes, _layer_index, _name, _shape, example_value,
                        is_parameter, token_axes)
from . import PassResult, register
from .prune import _SIZE_OPS, _apply_size_rewrites, _size_args


@dataclass
class TokenScheduleConfig:
    """``layers``: where the graph is cut (layer ``L`` and later see the reduced tokens; the
    attention of layer ``L - 1`` scores them), strictly increasing, >= 1. ``keep_ratios``: the
    fraction of the input's tokens left after each cut, in (0, 1], non-increasing (1.0 keeps
    every token: outputs equal the dense model's)."""

    layers: tuple[int, ...] = (4,)
    keep_ratios: tuple[float, ...] = (0.5,)

    MERGES: ClassVar[bool] = False  # the selector folds dropped tokens into kept ones
    PROPORTIONAL: ClassVar[bool] = False  # later attention weighs each key by its token size

    def __post_init__(self) -> None:
        if isinstance(self.layers, int) or isinstance(self.keep_ratios, (int, float)):
            raise ValueError(f"layers and keep_ratios must be lists, got layers={self.layers!r}, "
                             f"keep_ratios={self.keep_ratios!r}")
        self.layers, self.keep_ratios = tuple(self.layers), tuple(self.keep_ratios)
        if not self.layers or len(self.layers) != len(self.keep_ratios):
            raise ValueError(f"layers and keep_ratios must be non-empty and of one length, got {list(self.layers)} "
                             f"and {list(self.keep_ratios)}")
        for layer in self.layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
                raise ValueError(f"layers must be ints >= 1 (layer 0 has no attention before it to score with), "
                                 f"got {layer!r}")
        if any(b <= a for a, b in zip(self.layers, self.layers[1:])):
            raise ValueError(f"layers must be strictly increasing, got {list(self.layers)}")
        for ratio in self.keep_ratios:
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
                raise ValueError(f"keep_ratios must be numbers in (0, 1], got {ratio!r}")
        if any(b > a for a, b in zip(self.keep_ratios, self.keep_ratios[1:])):
            raise ValueError(f"keep_ratios must not increase, got {list(self.keep_ratios)}")

    def kept(self, cut: int, length: int) -> int:
        """Tokens left after cut ``cut`` of a ``length``-token input: max(1, round(length * ratio))."""
        return max(1, round(length * self.keep_ratios[cut]))


def per_layer(layers: tuple[int, ...] | list[int], values: list, first: Any, num_layers: int) -> list:
    """A schedule's value for every layer: ``first`` before the first cut, then each cut's value
    from its layer on (tokens per layer from kept counts, or the kept fraction from keep ratios)."""
    out = [first] * num_layers
    for layer, value in zip(layers, values):
        out[layer:] = [value] * (num_layers - layer)
    return out


@dataclass
class CutInputs:
    """What a selector sees at one cut: the scoring attention of layer ``L - 1``.

    query (B, H, S, D) and key (B, Hkv, S, D) at that attention (after RoPE), S tokens alive before
    the cut; probs (B, H, S, S), the attention probabilities where the graph computes them (the
    matmul-softmax form), else None; mask, the attention mask SDPA was given (bool: True attends;
    float: added to the logits) or None; sizes (S,), how many input tokens each token stands for.
    """

    query: torch.Tensor
    key: torch.Tensor
    probs: torch.Tensor | None
    mask: torch.Tensor | None
    sizes: torch.Tensor
    scale: float
    causal: bool


# selector(inputs, config, kept) -> (index (K,), merge (K, S) or None, sizes (K,))
Selector = Callable[[CutInputs, Any, int], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]
SELECTORS: dict[str, tuple[type, Selector]] = {}


def attention_rows(inputs: CutInputs, start: int, stop: int) -> torch.Tensor:
    """Attention probabilities of query rows [start, stop) over every key, fp32: (B, H, stop - start, S)."""
    if inputs.probs is not None:
        return inputs.probs[:, :, start:stop].float()
    q = inputs.query[:, :, start:stop].float()  # (B, H, r, D)
    group = q.shape[1] // inputs.key.shape[1]
    keys = inputs.key.float().repeat_interleave(group, dim=1)  # (B, H, S, D)
    logits = torch.matmul(q, keys.transpose(-1, -2)) * inputs.scale  # (B, H, r, S)
    if inputs.mask is not None:
        mask = inputs.mask[..., start:stop, :] if inputs.mask.shape[-2] > 1 else inputs.mask
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    if inputs.causal:
        q_pos = torch.arange(start, stop, device=q.device)  # (r,)
        k_pos = torch.arange(keys.shape[2], device=q.device)  # (S,)
        logits = logits.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    return logits.softmax(dim=-1)


def select_tokens(query: torch.Tensor, key: torch.Tensor, probs: torch.Tensor | None, mask: torch.Tensor | None,
                  sizes: torch.Tensor | None, *, method: str, params: dict, kept: int, scale: float, causal: bool,
                  key_transposed: bool) -> tuple[torch.Tensor, ...]:
    """One cut: the tokens that go on. query (B, H, S, D); key (B, Hkv, S, D), or (B, H, D, S) when
    ``key_transposed``; probs (B, H, S, S) or None; sizes (S,) or None (every token stands for one).
    Returns index (K,), sizes (K,) and, for merging methods, merge (K, S)."""
    config_cls, selector = SELECTORS[method]
    config = config_cls(**params)
    key = key.transpose(-1, -2) if key_transposed else key
    if sizes is None:
        sizes = torch.ones(key.shape[2], device=key.device)
    index, merge, new_sizes = selector(CutInputs(query, key, probs, mask, sizes, scale, causal), config, kept)
    return (index, new_sizes) + ((merge,) if config.MERGES else ())


def reduce_tokens(tensor: torch.Tensor, index: torch.Tensor, merge: torch.Tensor | None, axes: tuple[int, ...]) -> torch.Tensor:
    """The tokens of ``tensor`` that go on past a cut: along each axis in ``axes`` (S long), the
    rows ``index`` (K,), or with ``merge`` (K, S) the weighted sums of rows. Returns the tensor with
    K on those axes."""
    for axis in axes:
        if merge is None:
            tensor = tensor.index_select(axis, index)
        else:
            moved = tensor.movedim(axis, -1)  # (..., S)
            tensor = torch.matmul(moved, merge.t().to(tensor.dtype)).movedim(-1, axis)  # K on ``axis``
    return tensor


def weight_tokens(tensor: torch.Tensor, sizes: torch.Tensor, axis: int, mean: bool) -> torch.Tensor:
    """``tensor`` (K tokens on ``axis``) weighted by token sizes (K,), so that a sum over the axis
    counts every input token once, and a mean (``mean``) averages over input tokens."""
    weights = sizes * (sizes.shape[0] / sizes.sum()) if mean else sizes
    shape = [1] * tensor.dim()
    shape[axis] = -1
    return tensor * weights.view(shape).to(tensor.dtype)  # weights broadcast along ``axis``


def size_bias(mask: torch.Tensor | None, sizes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An additive SDPA mask with log token sizes (K,) added on the key axis (ToMe's proportional
    attention); ``mask`` (bool: True attends; float: added) is kept."""
    bias = sizes.log().to(dtype).view(1, 1, 1, -1)  # (1, 1, 1, K)
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return torch.zeros((), dtype=dtype, device=bias.device).masked_fill(~mask, float("-inf")) + bias
    return mask + bias


# ---------------------------------------------------------------------------------------------
# The graph rewrite
# ---------------------------------------------------------------------------------------------


class Refused(Exception):
    """The graph cannot be reduced safely; the message says why (shown in explain)."""


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
        layer = _layer_index(node, None) if node.op in ("call_function", "call_method") else None
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


def _plan(gm: fx.GraphModule, analysis: GraphAnalysis, config: TokenScheduleConfig, causal: bool,
          last_kept: int) -> tuple[list[_Cut], TokenAxes, dict[fx.Node, int], int]:
    """Check the graph and the schedule; returns the cuts, the token axes, the regions and the length."""
    sites = {s.layer: s for s in analysis.attention}
    if not sites:
        raise Refused("no attention found in this graph")
    for skipped in analysis.skipped:
        if skipped.kind == "attention":
            raise Refused(f"attention {skipped.node} was not understood ({skipped.reason}); a cut could miss it")
    if len(sites) != len(analysis.attention) or sorted(sites) != list(range(len(sites))):
        raise Refused(f"attention layers {sorted(s.layer for s in analysis.attention)} are not one per layer 0..n-1")
    if config.layers[-1] >= len(sites):
        raise ValueError(f"layers {list(config.layers)} reach past the model's {len(sites)} layers")
    first = sites[0]
    batch = _shape(first.query)[0]
    for site in sites.values():
        if site.q_len != first.q_len or site.kv_len != first.q_len:
            raise Refused(f"layer {site.layer} attends {site.q_len} queries to {site.kv_len} keys: token dropping "
                          "applies to a whole prompt with no past cache (a prefill), not to a decode step")
    if not isinstance(batch, int) or batch != 1:
        raise Refused(f"batch of {batch} sequences: each would keep different tokens; run one sequence at a time")
    # The kept counts are static: a prefill graph traced with a symbolic length is specialized to
    # this length here (Dynamo adds the guard; another prompt length compiles again).
    length = int(_shape(first.query)[2])
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
            raise Refused(f"{node.name} ({_name(node)}) reads tokens in a way the token-axis trace does not follow")
        for source in node.all_input_nodes:
            value = example_value(source)
            if region[source] < r and axes.axes[source] == () and isinstance(value, torch.Tensor) \
                    and source.op == "call_function" and length in value.shape and not is_parameter(source):
                raise Refused(f"{source.name} {tuple(value.shape)} has an axis as long as the sequence that the "
                              "token-axis trace did not reach")
        if node in axes.selections:
            _check_selection(node, axes.selections[node], causal, last_kept)
        if node in axes.reductions and (causal or _name(node) not in ("sum", "mean")):
            raise Refused(f"{node.name} ({_name(node)}) reduces over tokens after a cut: the result would change")
        if _name(node) in _SIZE_OPS and axes.axes[node]:
            args, _ = _size_args(node)
            for axis in axes.axes[node]:
                if axis >= len(args) or args[axis] not in (length, -1):
                    raise Refused(f"{node.name} sizes {args}: the token axis {axis} is not given as {length} or -1")
        if node in outputs.all_input_nodes and axes.axes[node] and causal and node not in cache_outputs:
            raise Refused(f"the graph returns {node.name} with one value per token (logits for every position?): "
                          "dropping tokens would change its shape; compile a forward that keeps only the last "
                          "position (logits_to_keep=1)")
    return cuts, axes, region, length


def _insert_selects(gm: fx.GraphModule, cuts: list[_Cut], config: TokenScheduleConfig, method: str) -> None:
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    previous = None
    for cut in cuts:
        site = cut.site
        probs = site.node if site.form == "matmul_softmax" else None
        mask = site.mask if site.form == "sdpa" else None
        args = (site.query, site.key, probs, mask, previous.sizes if previous else None)
        kwargs = dict(method=method, params=dataclasses.asdict(config), kept=cut.kept, scale=site.scale,
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
        if r and _name(node) in _SIZE_OPS and axes.axes.get(node):
            args, _ = _size_args(node)
            new = [cuts[r - 1].kept if i in axes.axes[node] and a == length else a for i, a in enumerate(args)]
            if new != args:
                rewrites.append((node, new))
    _apply_size_rewrites(rewrites)
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
            weighted = gm.graph.call_function(weight_tokens, (source, cuts[r - 1].sizes, axis, _name(node) == "mean"))
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


def token_reduction_pass(method: str, gm: fx.GraphModule, analysis: GraphAnalysis, config: TokenScheduleConfig,
                         causal: bool, last_kept: int) -> PassResult:
    """Cut ``gm`` at ``config.layers`` and reduce the tokens with ``method``'s selector (see the module
    docstring). ``causal``: the method is for decoders; ``last_kept``: tokens at the end of the
    sequence every cut keeps (decoders) or, for encoders, 1 for the first ([CLS])."""
    result = PassResult(method=method, family="tokens")
    try:
        cuts, axes, region, length = _plan(gm, analysis, config, causal, last_kept)
    except Refused as reason:
        result.sites["graph"] = f"not applied: {reason}"
        return result
    _insert_selects(gm, cuts, config, method)
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


def token_method(name: str, config: type[TokenScheduleConfig], *, causal: bool) -> Callable[[Selector], Selector]:
    """Decorator: register ``selector`` as tokens method ``name`` configured by ``config``, for causal
    decoders (``causal=True``, the config's ``window`` last tokens always kept) or encoders (the
    first token, [CLS], always kept)."""

    def add(selector: Selector) -> Selector:
        SELECTORS[name] = (config, selector)

        def apply(gm: fx.GraphModule, analysis: GraphAnalysis, cfg: TokenScheduleConfig) -> PassResult:
            return token_reduction_pass(name, gm, analysis, cfg, causal, cfg.window if causal else 1)

        register("tokens", name, config)(apply)
        return selector

    return add
