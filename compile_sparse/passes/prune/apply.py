"""The structured pruning pass (compile side): a Plan applied to the graph.

- an MLP keeps neurons K: the rows K of the gate and up weights (of both halves of a fused
  gate_up weight) and the columns K of the down weight become sliced buffers (``get_attr``), and
  every view / reshape / split size between them that carries the old width is rewritten;
- an attention block keeps query heads (and KV heads): the q (k, v) rows and the o columns of the
  kept heads, with the head counts and widths in view / reshape sizes rewritten. GQA stays valid:
  "query" units remove the same number of query heads from every KV group, "kv_group" units remove
  whole KV groups with their query heads.

Channels are scored per site; a head scores the sum of its channels (its o-projection input
columns, its q rows), a KV group the sum of its query heads. A Plan is computed once per model,
criterion, parameters and calibration batches (the backend's state keeps it) and reused for every
graph Dynamo compiles from that model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
import torch.fx as fx

from ..._torch_internals import propagate_shapes
from ...analysis import AttentionSite, GraphAnalysis, LinearOp, MLPSite, analyze
from ...analysis.ops import op_name
from ...plan import HeadPlan, MLPPlan, Plan, head_channels
from ...report import PassResult
from ..registry import method_of, register_pass
from ..toolkit import add_buffer, apply_size_rewrites, remove_dead_code, size_rewrites, weight_name, weight_value
from .config import StructuredPruneConfig
from .plan_build import build_plan, head_refusal


def slice_weight(gm: fx.GraphModule, inputs: Sequence[Any], linear: LinearOp, keep: torch.Tensor, side: str) -> None:
    """Keep output features (``side="out"``) or input features (``"in"``) ``keep`` of a projection;
    the bias follows the output side."""
    weight = weight_value(gm, linear.weight, inputs)
    axis = (0 if side == "out" else 1) if linear.weight_layout == "out_in" else (1 if side == "out" else 0)
    new = add_buffer(gm, linear.weight.name, weight.index_select(axis, keep))
    linear.weight.replace_all_uses_with(new)
    if side == "out" and linear.bias is not None:
        bias = add_buffer(gm, linear.bias.name, weight_value(gm, linear.bias, inputs).index_select(0, keep))
        linear.bias.replace_all_uses_with(bias)


def _add_bias(gm: fx.GraphModule, inputs: Sequence[Any], linear: LinearOp, extra: list[float]) -> None:
    """Add ``extra`` (out,) to the projection's output through its bias argument."""
    if len(extra) != linear.out_features:
        raise ValueError(f"{weight_name(linear.weight)}: the plan's compensation bias has {len(extra)} values, the "
                         f"projection {linear.out_features} outputs")
    weight = weight_value(gm, linear.weight, inputs)
    extra_t = torch.tensor(extra, dtype=weight.dtype, device=weight.device)
    if linear.bias is not None:
        bias = add_buffer(gm, linear.bias.name, weight_value(gm, linear.bias, inputs) + extra_t)
        linear.node.replace_input_with(linear.bias, bias)
    elif op_name(linear.node) == "linear":
        bias = add_buffer(gm, f"{linear.weight.name}_bias", extra_t)
        args = list(linear.node.args) + [None] * (3 - len(linear.node.args))
        args[2] = bias
        linear.node.args = tuple(args)
        linear.node.kwargs = {k: v for k, v in linear.node.kwargs.items() if k != "bias"}
    else:
        raise ValueError(f"{linear.node.name}: cannot add a compensation bias to a bias-free {op_name(linear.node)}")


def _apply_mlp(gm: fx.GraphModule, inputs: Sequence[Any], site: MLPSite, entry: MLPPlan) -> None:
    keep = torch.tensor(entry.keep, dtype=torch.long)
    width = len(entry.keep)
    rewrites = []
    producers = {p.weight: p for p in (site.gate, site.up) if p is not None}  # one entry for fused gate_up
    for producer in producers.values():
        rewrites += size_rewrites(producer.node, site.down.node, {site.intermediate_size: width})
    if site.fused and op_name(site.up.part.args[0]) != "chunk":  # split sizes carry the width
        split = site.up.part.args[0]
        sizes = split.args[1]
        split.args = (split.args[0], width if isinstance(sizes, int) else [width] * len(sizes), *split.args[2:])
    rows = entry.producer_rows()
    for producer in producers.values():
        slice_weight(gm, inputs, producer, rows[weight_name(producer.weight)], "out")
    slice_weight(gm, inputs, site.down, keep, "in")
    if entry.bias is not None:
        _add_bias(gm, inputs, site.down, entry.bias)
    apply_size_rewrites(rewrites)


def _apply_heads(gm: fx.GraphModule, inputs: Sequence[Any], site: AttentionSite, entry: HeadPlan) -> None:
    hd = site.head_dim
    heads, kv = len(entry.keep_heads), len(entry.keep_kv_heads)
    q_rows = head_channels(entry.keep_heads, hd)
    kv_rows = head_channels(entry.keep_kv_heads, hd)
    group = site.num_heads // site.num_kv_heads
    rewrites = size_rewrites(site.q.node, site.node, {site.num_heads: heads})
    for proj in (site.k, site.v):
        rewrites += size_rewrites(proj.node, site.node, {site.num_kv_heads: kv, site.num_heads: heads},
                                   {group: heads // kv})
    rewrites += size_rewrites(site.node, site.o.node, {site.num_heads * hd: heads * hd, site.num_heads: heads})
    slice_weight(gm, inputs, site.q, q_rows, "out")
    if kv != site.num_kv_heads:
        for proj in (site.k, site.v):
            slice_weight(gm, inputs, proj, kv_rows, "out")
    slice_weight(gm, inputs, site.o, q_rows, "in")
    if entry.bias is not None:
        _add_bias(gm, inputs, site.o, entry.bias)
    apply_size_rewrites(rewrites)


def apply_plan(gm: fx.GraphModule, analysis: GraphAnalysis, plan: Plan, refused: dict[str, str] | None = None) -> PassResult:
    """Slice this graph's sites as the plan says; sites the plan keeps whole are not touched. The
    parameters before and after are counted on the sites the analysis finds before and after."""
    result = PassResult(plan.method, "prune", rewrites={"mlp": 0, "heads": 0})
    for site, reason in (refused or {}).items():
        result.refuse(site, reason)
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
        result.sites[site.name] = f"kept {len(entry.keep)} of {site.intermediate_size} neurons" + \
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
        result.sites[site.name] = (
            f"kept {len(entry.keep_heads)} of {site.num_heads} query heads, "
            f"{len(entry.keep_kv_heads)} of {site.num_kv_heads} KV heads" + (" (+ compensation bias)" if entry.bias else ""))
    if result.rewrites["mlp"] or result.rewrites["heads"]:
        remove_dead_code(gm)
        gm.recompile()
        propagate_shapes(gm)
        pruned = analyze(gm, analysis.inputs)
        result.params = {"before": sum(s.num_params() for s in [*analysis.mlp, *analysis.attention]),
                         "after": sum(s.num_params() for s in [*pruned.mlp, *pruned.attention])}
    return result




def _plan_key(gm: fx.GraphModule, analysis: GraphAnalysis, config: StructuredPruneConfig) -> tuple:
    """What a Plan depends on besides the model's weights: the criterion, its parameters and the
    calibration batches."""
    params = tuple((f.name, getattr(config, f.name)) for f in dataclasses.fields(config)
                   if f.name not in ("calibration", "save_plan"))
    batches = tuple(id(b) for b in config.calibration or ())
    return (method_of(config)[1], params, batches)


def _weights(gm: fx.GraphModule, analysis: GraphAnalysis) -> list[torch.Tensor]:
    """The weight tensors a Plan of this graph reads: the model's identity for the plan cache."""
    return [weight_value(gm, w, analysis.inputs)
            for w in [s.down.weight for s in analysis.mlp] + [s.q.weight for s in analysis.attention]]


@register_pass(StructuredPruneConfig)
def structured_prune_pass(gm: fx.GraphModule, analysis: GraphAnalysis, config: StructuredPruneConfig,
                          ctx) -> PassResult:
    """Build (or reuse) the Plan for this model and apply it."""
    refused = {site.name: reason for site in analysis.attention
               if config.head_ratio > 0 and (reason := head_refusal(site)) is not None}
    if config.mlp_ratio > 0:
        refused.update({region.name: region.reason for region in analysis.skipped if region.kind == "experts"})
    method = method_of(config)[1]
    key = _plan_key(gm, analysis, config)
    weights = _weights(gm, analysis)
    plan = ctx.state.plans.get(weights, key)
    if plan is None:
        plan = build_plan(gm, analysis, config, method)
        ctx.state.plans.put(weights, key, plan)
        if config.save_plan:
            plan.save(config.save_plan)
    return apply_plan(gm, analysis, plan, refused)
