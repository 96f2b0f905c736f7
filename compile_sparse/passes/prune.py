"""Structured pruning: MLP neurons and attention heads, physically removed.

The shared base of the structured criteria (magnitude.py, wanda.py, flap.py, taylor.py,
d2prune.py). A criterion only scores channels; this module calibrates, allocates the removals per
layer, builds a Plan (compile_sparse.plan) and applies it to the graph:

- an MLP keeps neurons K: the rows K of the gate and up weights and the columns K of the down
  weight become sliced buffers (``get_attr``), and every view / reshape size between them that
  carries the old width is rewritten;
- an attention block keeps query heads (and KV heads): the q (k, v) rows and the o columns of the
  kept heads, with the head counts and widths in view / reshape sizes rewritten. GQA stays valid:
  "query" units remove the same number of query heads from every KV group, "kv_group" units remove
  whole KV groups with their query heads.

Channels are scored per site; a head scores the sum of its channels (its o-projection input
columns, its q rows), a KV group the sum of its query heads.
"""

from __future__ import annotations

import operator
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import torch
import torch.fx as fx

from .._torch_internals import parameter_name, propagate_shapes
from ..analysis import AttentionSite, GraphAnalysis, LinearOp, MLPSite, _name, analyze, as_linear, example_value
from ..calibration import Calibration, ChannelStats, calibrate
from ..plan import HeadPlan, MLPPlan, Plan, head_channels
from . import PassResult, register

ALLOCATIONS = ("uniform", "standardized", "outlier")
HEAD_UNITS = ("query", "kv_group")
# Outlier-aware allocation (after OWL): an outlier is a |W| x ||X|| entry above OUTLIER_M times its
# layer's mean; layer keep ratios spread over +-OUTLIER_LAMBDA around the target, more kept where
# there are more outliers.
OUTLIER_M = 5.0
OUTLIER_LAMBDA = 0.08
_SIZE_OPS = {"view", "reshape", "expand", "_unsafe_view"}
_MAX_WALK = 64


@dataclass
class StructuredPruneConfig:
    """``mlp_ratio``: fraction of MLP neurons removed (uniform: every MLP keeps
    round(width x (1 - mlp_ratio))). ``head_ratio``: fraction of query heads removed, in units of
    ``head_unit``: "query" removes round(group x head_ratio) query heads from every KV group,
    "kv_group" removes round(kv_heads x head_ratio) KV groups. ``allocation``: "uniform", or
    adaptive per layer under the same global count: "standardized" (FLAP: scores z-scored per
    layer, the globally lowest removed) or "outlier" (OWL-style layer ratios from the share of
    outlier activations). ``calibration``: token-id batches, each shaped like the compiled input.
    ``save_plan``: write the Plan here as JSON."""

    mlp_ratio: float = 0.0
    head_ratio: float = 0.0
    head_unit: str = "query"
    allocation: str = "uniform"
    calibration: Sequence[torch.Tensor] | None = None
    save_plan: str | None = None

    NEEDS: ClassVar[str] = "weights"  # "weights", "activations" or "gradients"
    BIAS_COMPENSATION: ClassVar[bool] = False

    def __post_init__(self):
        for name in ("mlp_ratio", "head_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
        if self.head_unit not in HEAD_UNITS:
            raise ValueError(f"head_unit must be one of {', '.join(HEAD_UNITS)}, got {self.head_unit!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if self.calibration is not None:
            if isinstance(self.calibration, torch.Tensor) or len(self.calibration) == 0:
                raise ValueError("calibration must be a non-empty list of token-id tensors, got "
                                 f"{type(self.calibration).__name__}")
        if self.needs_calibration() and self.calibration is None:
            raise ValueError(f"{type(self).__name__} needs calibration batches "
                             f"({'a criterion that reads ' + self.NEEDS if self.NEEDS != 'weights' else ''}"
                             f"{' and ' if self.NEEDS != 'weights' and self.allocation == 'outlier' else ''}"
                             f"{'outlier allocation' if self.allocation == 'outlier' else ''}); "
                             "pass calibration=[token ids, ...]")

    def needs_calibration(self) -> bool:
        return self.NEEDS != "weights" or self.allocation == "outlier" or self.BIAS_COMPENSATION


@dataclass
class ChannelGroup:
    """The weights around C prunable channels: ``producers`` write them (rows, each (C, in)),
    ``consumer`` reads them (columns, (out, C)); gradients of the same shapes when calibrated with
    gradients; ``stats`` of the consumer's input activation when calibrated."""

    producers: list[torch.Tensor]
    consumer: torch.Tensor
    producer_grads: list[torch.Tensor | None]
    consumer_grad: torch.Tensor | None
    stats: ChannelStats | None


Scorer = Callable[[ChannelGroup], torch.Tensor]
SCORERS: dict[str, Scorer] = {}


def prune_method(name: str, config: type) -> Callable[[Scorer], Scorer]:
    """Register a structured criterion: ``score(group) -> (C,)``, higher means keep."""

    def add(score: Scorer) -> Scorer:
        SCORERS[name] = score
        register("prune", name, config)(lambda gm, analysis, cfg: structured_prune_pass(gm, analysis, cfg, name))
        return score

    return add


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


def _value(gm: fx.GraphModule, node: fx.Node, inputs: Sequence[Any]) -> torch.Tensor:
    """The real tensor of a weight node: a placeholder's example input or a get_attr buffer."""
    if node.op == "get_attr":
        return operator.attrgetter(node.target)(gm)  # a dotted path in a torch.fx trace: "mlp.down.weight"
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return inputs[placeholders.index(node)]


def _rows(linear: LinearOp, weight: torch.Tensor) -> torch.Tensor:
    """The weight as (out, in), whatever its stored layout."""
    return weight if linear.weight_layout == "out_in" else weight.t()


def weight_name(node: fx.Node) -> str:
    """The parameter name a weight node stands for (its buffer name for get_attr), else the node's name."""
    if node.op == "placeholder":
        return parameter_name(node) or node.name
    return str(node.target) if node.op == "get_attr" else node.name


def _group(gm: fx.GraphModule, inputs: Sequence[Any], producers: list[LinearOp], consumer: LinearOp,
           calib: Calibration | None) -> ChannelGroup:
    def grad(linear: LinearOp) -> torch.Tensor | None:
        g = calib.weight_grads.get(linear.weight.name) if calib else None
        return None if g is None else _rows(linear, g)

    return ChannelGroup([_rows(p, _value(gm, p.weight, inputs)) for p in producers],
                        _rows(consumer, _value(gm, consumer.weight, inputs)), [grad(p) for p in producers],
                        grad(consumer), calib.stats.get(consumer.input.name) if calib else None)


# ---------------------------------------------------------------------------------------------
# Units and allocation
# ---------------------------------------------------------------------------------------------


def _head_units(head_scores: torch.Tensor, num_kv: int, unit: str) -> tuple[torch.Tensor, list[list[int]]]:
    """Removal units of one attention block: (scores (U,), the heads each removes). "query": unit
    k removes the k-th weakest query head of every group; "kv_group": one whole group."""
    group = head_scores.numel() // num_kv
    per_group = head_scores.view(num_kv, group)  # (kv, group)
    if unit == "kv_group" or group == 1:  # without GQA every head is its own group
        return per_group.sum(1), [list(range(g * group, (g + 1) * group)) for g in range(num_kv)]
    order = per_group.argsort(dim=1)  # (kv, group), weakest first
    scores = per_group.gather(1, order).sum(0)  # (group,)
    heads = [[g * group + int(order[g, k]) for g in range(num_kv)] for k in range(group)]
    return scores, heads


def _uniform_removals(sizes: list[int], ratio: float) -> list[int]:
    """size - round(size x (1 - ratio)) per layer, leaving at least one unit."""
    return [min(size - round(size * (1 - ratio)), size - 1) for size in sizes]


def _allocate(scores: list[torch.Tensor], ratio: float, allocation: str, outliers: list[float] | None) -> list[int]:
    """How many units each layer removes: the uniform count everywhere, or the same total spread by
    standardized scores or outlier shares. Every layer keeps at least one unit."""
    sizes = [s.numel() for s in scores]
    uniform = _uniform_removals(sizes, ratio)
    total = sum(uniform)
    if allocation == "uniform" or total == 0:
        return uniform
    if allocation == "standardized":
        pooled = []
        for layer, s in enumerate(scores):
            s = s.double()
            z = (s - s.mean()) / s.std().clamp_min(1e-12) if s.numel() > 1 else torch.zeros_like(s)
            pooled += [(float(v), layer) for v in z]
        removed = [0] * len(scores)
        for _, layer in sorted(pooled):
            if sum(removed) == total:
                break
            if removed[layer] < sizes[layer] - 1:
                removed[layer] += 1
        return removed
    d = torch.tensor(outliers, dtype=torch.float64)
    spread = (d - d.min()) / (d.max() - d.min()).clamp_min(1e-12) * (2 * OUTLIER_LAMBDA)
    keep_ratio = spread - spread.mean() + (1 - total / sum(sizes))
    wanted = [max(0.0, min(size - 1.0, size * (1 - float(k)))) for size, k in zip(sizes, keep_ratio)]
    return _round_to_total(wanted, sizes, total)


def _round_to_total(wanted: list[float], sizes: list[int], total: int) -> list[int]:
    """Integer removals near ``wanted`` that sum to ``total``: floors, then one more for the
    largest remainders (or one less for the smallest), round robin, within [0, size - 1]."""
    removed = [int(math.floor(w)) for w in wanted]
    order = sorted(range(len(sizes)), key=lambda i: wanted[i] - removed[i], reverse=True)
    step = 0
    while sum(removed) < total and any(removed[i] < sizes[i] - 1 for i in order):
        layer = order[step % len(order)]
        removed[layer] += removed[layer] < sizes[layer] - 1
        step += 1
    while sum(removed) > total:
        layer = order[-1 - step % len(order)]
        removed[layer] -= removed[layer] > 0
        step += 1
    return removed


def _outlier_share(group: ChannelGroup) -> float:
    """Share of |W| x ||X|| entries of the consumer above OUTLIER_M times their mean."""
    metric = group.consumer.abs() * group.stats.norm.to(group.consumer.dtype)  # (out, C)
    return float((metric > OUTLIER_M * metric.mean()).double().mean())


def _compensation(group: ChannelGroup, removed: torch.Tensor, enabled: bool) -> list[float] | None:
    """FLAP's bias: what the removed channels contributed on average, W[:, removed] @ mean[removed]."""
    if not enabled or removed.numel() == 0:
        return None
    bias = group.consumer[:, removed].double() @ group.stats.mean[removed]  # (out,)
    return bias.tolist()


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


def head_refusal(site: AttentionSite) -> str | None:
    """Why the heads of this attention block cannot be pruned, or None."""
    if site.qkv_fused:
        return "q, k and v come from one fused projection (split sizes carry the head count): heads not pruned"
    if site.o is None:
        return "no output projection after the attention: heads not pruned"
    return None


def build_plan(gm: fx.GraphModule, analysis: GraphAnalysis, config: StructuredPruneConfig, method: str) -> Plan:
    """Calibrate (if the criterion needs it), score, allocate: the Plan for this graph's sites."""
    mlps = analysis.mlp if config.mlp_ratio > 0 else []
    heads = [s for s in analysis.attention if head_refusal(s) is None] if config.head_ratio > 0 else []
    calib = None
    if config.needs_calibration() and (mlps or heads):
        consumers = [s.down for s in mlps] + [s.o for s in heads]
        weights = [p.weight for s in mlps for p in (s.gate, s.up, s.down) if p is not None] + \
                  [p.weight for s in heads for p in (s.q, s.o)]
        calib = calibrate(gm, analysis.inputs, config.calibration, [c.input for c in consumers],
                          grad_weights=weights, gradients=config.NEEDS == "gradients")
    score = SCORERS[method]
    inputs = analysis.inputs
    plan = Plan(method)

    groups = [_group(gm, inputs, [p for p in (s.gate, s.up) if p is not None], s.down, calib) for s in mlps]
    scores = [score(g) for g in groups]
    outliers = [_outlier_share(g) for g in groups] if config.allocation == "outlier" else None
    for site, group, s, n in zip(mlps, groups, scores, _allocate(scores, config.mlp_ratio, config.allocation, outliers)):
        order = s.argsort()
        removed, keep = order[:n], order[n:].sort().values
        plan.mlp.append(MLPPlan(site.layer, site.intermediate_size, keep.tolist(),
                                {"gate": weight_name(site.gate.weight) if site.gate else None,
                                 "up": weight_name(site.up.weight), "down": weight_name(site.down.weight)},
                                _compensation(group, removed, config.BIAS_COMPENSATION)))

    head_groups, units = [], []
    for site in heads:
        # per-head (C,) channel views: q rows and o columns of head h are channels h*hd .. (h+1)*hd
        group = _group(gm, inputs, [site.q], site.o, calib)
        head_groups.append(group)
        channel = score(group)  # (H * hd,)
        units.append(_head_units(channel.view(site.num_heads, site.head_dim).sum(1), site.num_kv_heads,
                                 config.head_unit))
    outliers = [_outlier_share(g) for g in head_groups] if config.allocation == "outlier" else None
    counts = _allocate([u[0] for u in units], config.head_ratio, config.allocation, outliers)
    for site, group, (unit_scores, unit_heads), n in zip(heads, head_groups, units, counts):
        dropped = sorted(h for k in unit_scores.argsort()[:n].tolist() for h in unit_heads[k])
        keep = [h for h in range(site.num_heads) if h not in dropped]
        group_size = site.num_heads // site.num_kv_heads
        keep_kv = sorted({h // group_size for h in keep})
        channels = head_channels(dropped, site.head_dim)
        plan.heads.append(HeadPlan(site.layer, site.num_heads, site.num_kv_heads, site.head_dim, keep, keep_kv,
                                   {k: weight_name(getattr(site, k).weight) for k in ("q", "k", "v", "o")},
                                   _compensation(group, channels, config.BIAS_COMPENSATION)))
    return plan


# ---------------------------------------------------------------------------------------------
# Applying a plan to the graph
# ---------------------------------------------------------------------------------------------


def _forward_nodes(start: fx.Node, stop: fx.Node) -> list[fx.Node]:
    """Nodes reached from ``start`` through users, up to (not past) ``stop`` or another projection."""
    seen, queue, found = {start}, [start], []
    while queue and len(seen) < _MAX_WALK:
        node = queue.pop(0)
        for user in node.users:
            if user in seen or user is stop or user.op == "output" or as_linear(user) is not None:
                continue
            seen.add(user)
            found.append(user)
            queue.append(user)
    return found


def _size_args(node: fx.Node) -> tuple[list, bool]:
    """The size arguments of a view / reshape / expand, and whether they are one list argument."""
    flat = len(node.args) == 2 and isinstance(node.args[1], (list, tuple))
    return list(node.args[1] if flat else node.args[1:]), flat


def _size_rewrites(start: fx.Node, stop: fx.Node, sizes: dict[int, int],
                   repeats: dict[int, int] | None = None) -> list[tuple[fx.Node, list]]:
    """New size arguments for the view / reshape / expand nodes between ``start`` and ``stop``
    that carry an old size (``sizes``: old -> new), as (node, new sizes).

    A view / reshape size is rewritten where the node's recorded output has that old size on the
    same axis; two candidates on one node are ambiguous and refused. An expand keeps its
    non-broadcast axes as -1 (the input's size, whatever it becomes) and maps the broadcast axes by
    ``repeats`` (old -> new repeat count: GQA's repeat_kv)."""
    rewrites = []
    for node in _forward_nodes(start, stop):
        if _name(node) not in _SIZE_OPS:
            continue
        args, _ = _size_args(node)
        if not all(isinstance(a, int) for a in args):
            continue  # symbolic sizes come from the inputs' own shapes, which pruning does not change
        new = list(args)
        if _name(node) == "expand":
            source = tuple(example_value(node.args[0]).shape)
            offset = len(args) - len(source)
            for i in range(offset, len(args)):
                if source[i - offset] == args[i] != 1:
                    new[i] = -1
                elif source[i - offset] == 1 and repeats and args[i] in repeats:
                    new[i] = repeats[args[i]]
        else:
            shape = tuple(example_value(node).shape)
            hits = [i for i, a in enumerate(args) if a in sizes and i < len(shape) and shape[i] == a]
            if len(hits) > 1:
                raise ValueError(f"{node.name}: sizes {args} carry an old size on {len(hits)} axes; cannot tell "
                                 "which one to rewrite")
            for i in hits:
                new[i] = sizes[args[i]]
        if new != args:
            rewrites.append((node, new))
    return rewrites


def _apply_size_rewrites(rewrites: list[tuple[fx.Node, list]]) -> None:
    for node, sizes in rewrites:
        _, flat = _size_args(node)
        node.args = (node.args[0], type(node.args[1])(sizes)) if flat else (node.args[0], *sizes)


def _buffer(gm: fx.GraphModule, name: str, value: torch.Tensor) -> fx.Node:
    """A get_attr node, at the top of the graph, for a new buffer holding ``value``."""
    target = f"pruned_{name}".replace(".", "_")
    gm.register_buffer(target, value.detach().clone().contiguous())
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first):
        return gm.graph.get_attr(target)


def _slice_weight(gm: fx.GraphModule, inputs: Sequence[Any], linear: LinearOp, keep: torch.Tensor, side: str) -> None:
    """Keep output features (``side="out"``) or input features (``"in"``) ``keep`` of a projection;
    the bias follows the output side."""
    weight = _value(gm, linear.weight, inputs)
    axis = (0 if side == "out" else 1) if linear.weight_layout == "out_in" else (1 if side == "out" else 0)
    new = _buffer(gm, linear.weight.name, weight.index_select(axis, keep))
    linear.weight.replace_all_uses_with(new)
    if side == "out" and linear.bias is not None:
        bias = _buffer(gm, linear.bias.name, _value(gm, linear.bias, inputs).index_select(0, keep))
        linear.bias.replace_all_uses_with(bias)


def _add_bias(gm: fx.GraphModule, inputs: Sequence[Any], linear: LinearOp, extra: list[float]) -> None:
    """Add ``extra`` (out,) to the projection's output through its bias argument."""
    weight = _value(gm, linear.weight, inputs)
    extra_t = torch.tensor(extra, dtype=weight.dtype, device=weight.device)
    if linear.bias is not None:
        bias = _buffer(gm, linear.bias.name, _value(gm, linear.bias, inputs) + extra_t)
        linear.node.replace_input_with(linear.bias, bias)
    elif _name(linear.node) == "linear":
        bias = _buffer(gm, f"{linear.weight.name}_bias", extra_t)
        args = list(linear.node.args) + [None] * (3 - len(linear.node.args))
        args[2] = bias
        linear.node.args = tuple(args)
        linear.node.kwargs = {k: v for k, v in linear.node.kwargs.items() if k != "bias"}
    else:
        raise ValueError(f"{linear.node.name}: cannot add a compensation bias to a bias-free {_name(linear.node)}")


def _apply_mlp(gm: fx.GraphModule, inputs: Sequence[Any], site: MLPSite, entry: MLPPlan) -> None:
    keep = torch.tensor(entry.keep, dtype=torch.long)
    rewrites = []
    for producer in (site.gate, site.up):
        if producer is not None:
            rewrites += _size_rewrites(producer.node, site.down.node, {site.intermediate_size: len(entry.keep)})
    for producer in (site.gate, site.up):
        if producer is not None:
            _slice_weight(gm, inputs, producer, keep, "out")
    _slice_weight(gm, inputs, site.down, keep, "in")
    if entry.bias is not None:
        _add_bias(gm, inputs, site.down, entry.bias)
    _apply_size_rewrites(rewrites)


def _apply_heads(gm: fx.GraphModule, inputs: Sequence[Any], site: AttentionSite, entry: HeadPlan) -> None:
    hd = site.head_dim
    heads, kv = len(entry.keep_heads), len(entry.keep_kv_heads)
    q_rows = head_channels(entry.keep_heads, hd)
    kv_rows = head_channels(entry.keep_kv_heads, hd)
    group = site.num_heads // site.num_kv_heads
    rewrites = _size_rewrites(site.q.node, site.node, {site.num_heads: heads})
    for proj in (site.k, site.v):
        rewrites += _size_rewrites(proj.node, site.node, {site.num_kv_heads: kv, site.num_heads: heads},
                                   {group: heads // kv})
    rewrites += _size_rewrites(site.node, site.o.node, {site.num_heads * hd: heads * hd, site.num_heads: heads})
    _slice_weight(gm, inputs, site.q, q_rows, "out")
    if kv != site.num_kv_heads:
        for proj in (site.k, site.v):
            _slice_weight(gm, inputs, proj, kv_rows, "out")
    _slice_weight(gm, inputs, site.o, q_rows, "in")
    if entry.bias is not None:
        _add_bias(gm, inputs, site.o, entry.bias)
    _apply_size_rewrites(rewrites)


def apply_plan(gm: fx.GraphModule, analysis: GraphAnalysis, plan: Plan, refused: dict[str, str] | None = None) -> PassResult:
    """Slice this graph's sites as the plan says; sites the plan keeps whole are not touched. The
    parameters before and after are counted on the sites the analysis finds before and after."""
    result = PassResult(plan.method, "prune", rewrites={"mlp": 0, "heads": 0}, sites=dict(refused or {}))
    by_down = {m.weights["down"]: m for m in plan.mlp}
    by_o = {h.weights["o"]: h for h in plan.heads}
    for site in analysis.mlp:
        entry = by_down.get(weight_name(site.down.weight))
        if entry is None or (len(entry.keep) == site.intermediate_size and entry.bias is None):
            continue
        if entry.width != site.intermediate_size:
            raise ValueError(f"the plan's layer {entry.layer} MLP has width {entry.width}, the graph's "
                             f"{site.intermediate_size}: a plan made for another model")
        _apply_mlp(gm, analysis.inputs, site, entry)
        result.rewrites["mlp"] += 1
        result.sites[f"layer {site.layer} mlp"] = f"kept {len(entry.keep)} of {site.intermediate_size} neurons" + \
            (" (+ compensation bias)" if entry.bias is not None else "")
    for site in analysis.attention:
        entry = by_o.get(weight_name(site.o.weight)) if site.o is not None else None
        if entry is None or (len(entry.keep_heads) == site.num_heads and entry.bias is None):
            continue
        if (entry.num_heads, entry.num_kv_heads, entry.head_dim) != (site.num_heads, site.num_kv_heads, site.head_dim):
            raise ValueError(f"the plan's layer {entry.layer} attention has {entry.num_heads}/{entry.num_kv_heads} heads "
                             f"of {entry.head_dim}, the graph's {site.num_heads}/{site.num_kv_heads} of {site.head_dim}")
        reason = head_refusal(site)
        if reason is not None:
            raise ValueError(f"layer {site.layer} attention: {reason}")
        if len(entry.keep_kv_heads) < site.num_kv_heads and site.has_cache:
            raise ValueError(f"layer {site.layer} attention: removing KV heads from a graph that fills a KV cache "
                             "leaves a cache the next call cannot read (Dynamo traces the unpruned model); use "
                             "head_unit='query', use_cache=False, or export the pruned model and compile that")
        _apply_heads(gm, analysis.inputs, site, entry)
        result.rewrites["heads"] += 1
        result.sites[f"layer {site.layer} attention"] = (
            f"kept {len(entry.keep_heads)} of {site.num_heads} query heads, "
            f"{len(entry.keep_kv_heads)} of {site.num_kv_heads} KV heads" + (" (+ compensation bias)" if entry.bias else ""))
    if result.rewrites["mlp"] or result.rewrites["heads"]:
        gm.graph.eliminate_dead_code()
        gm.recompile()
        propagate_shapes(gm)
        pruned = analyze(gm, analysis.inputs)
        result.params = {"before": sum(s.num_params() for s in [*analysis.mlp, *analysis.attention]),
                         "after": sum(s.num_params() for s in [*pruned.mlp, *pruned.attention])}
    return result


_PLANS: dict[tuple, Plan] = {}


def _plan_key(gm: fx.GraphModule, analysis: GraphAnalysis, config: StructuredPruneConfig, method: str) -> tuple:
    """Plans are computed once per model (the storage of its MLP and attention weights),
    criterion, parameters and calibration batches, and reused for every graph Dynamo compiles from
    that model (prefill, decode, recompiles), which may not hold the calibration input."""
    params = tuple((f.name, getattr(config, f.name)) for f in dataclasses.fields(config)
                   if f.name not in ("calibration", "save_plan"))
    batches = tuple(id(b) for b in config.calibration or ())
    weights = tuple(_value(gm, w, analysis.inputs).data_ptr()
                    for w in [s.down.weight for s in analysis.mlp] + [s.q.weight for s in analysis.attention])
    return (method, params, batches, weights)


def structured_prune_pass(gm: fx.GraphModule, analysis: GraphAnalysis, config: StructuredPruneConfig,
                          method: str) -> PassResult:
    refused = {f"layer {site.layer} attention": reason for site in analysis.attention
               if config.head_ratio > 0 and (reason := head_refusal(site)) is not None}
    key = _plan_key(gm, analysis, config, method)
    if key not in _PLANS:
        _PLANS[key] = build_plan(gm, analysis, config, method)
        if config.save_plan:
            _PLANS[key].save(config.save_plan)
    return apply_plan(gm, analysis, _PLANS[key], refused)
