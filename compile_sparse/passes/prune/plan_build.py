"""Building a pruning Plan: calibrate (when the criterion reads data), score every channel group,
allocate the removals per layer, and record which neurons and heads each layer keeps."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx

from ...analysis import AttentionSite, GraphAnalysis, LinearOp
from ...analysis.ops import is_parameter, shape_of
from ...calibration import Calibration, calibrate
from ...plan import HeadPlan, MLPPlan, Plan, head_channels
from ..toolkit import forward_nodes, out_in, weight_name, weight_value
from .allocate import allocate, head_units, outlier_share
from .config import ChannelGroup, StructuredPruneConfig


def channel_group(gm: fx.GraphModule, inputs: Sequence[Any], producers: list[LinearOp], consumer: LinearOp,
                  calib: Calibration | None) -> ChannelGroup:
    """The weights (as (out, in)), gradients and activation statistics around a consumer's input channels."""
    def grad(linear: LinearOp) -> torch.Tensor | None:
        g = calib.weight_grads.get(linear.weight.name) if calib else None
        return None if g is None else out_in(linear, g)

    return ChannelGroup([out_in(p, weight_value(gm, p.weight, inputs)) for p in producers],
                        out_in(consumer, weight_value(gm, consumer.weight, inputs)), [grad(p) for p in producers],
                        grad(consumer), calib.stats.get(consumer.input.name) if calib else None)


def compensation(group: ChannelGroup, removed: torch.Tensor, enabled: bool) -> list[float] | None:
    """FLAP's bias: what the removed channels contributed on average, W[:, removed] @ mean[removed]."""
    if not enabled or removed.numel() == 0:
        return None
    bias = group.consumer[:, removed].double() @ group.stats.mean[removed]  # (out,)
    return bias.tolist()


def head_refusal(site: AttentionSite) -> str | None:
    """Why the heads of this attention block cannot be pruned, or None."""
    if site.qkv_fused:
        return "q, k and v come from one fused projection (split sizes carry the head count): heads not pruned"
    if site.o is None:
        return "no output projection after the attention: heads not pruned"
    for proj, heads in ((site.q, site.num_heads), (site.k, site.num_kv_heads)):
        width = heads * site.head_dim
        if any(is_parameter(arg) and (shape_of(arg) or (0,))[-1] == width
               for node in forward_nodes(proj.node, site.node) for arg in node.all_input_nodes):
            return (f"a parameter of the projection's full width ({width}) acts on it across all heads (OLMo-2's "
                    "QK-norm?): heads not pruned")
    mask = shape_of(site.mask) if site.mask is not None else None
    if mask is not None and len(mask) == 4 and mask[1] != 1:
        return ("the scores add a bias per head (relative positions or ALiBi), which the pass does not slice: "
                "heads not pruned")
    return None

def build_plan(gm: fx.GraphModule, analysis: GraphAnalysis, config: StructuredPruneConfig, method: str) -> Plan:
    """Calibrate (if the criterion needs it), score, allocate: the Plan for this graph's sites."""
    mlps = analysis.mlp if config.mlp_ratio > 0 else []
    heads = [s for s in analysis.attention if head_refusal(s) is None] if config.head_ratio > 0 else []
    calib = None
    if config.needs_calibration() and (mlps or heads):
        consumers = [s.down for s in mlps] + [s.o for s in heads]
        weights = list(dict.fromkeys([p.weight for s in mlps for p in (s.gate, s.up, s.down) if p is not None] +
                                     [p.weight for s in heads for p in (s.q, s.o)]))  # fused gate_up once
        calib = calibrate(gm, analysis.inputs, config.calibration, [c.input for c in consumers],
                          grad_weights=weights, gradients=config.NEEDS == "gradients")
    score = config.score
    inputs = analysis.inputs
    plan = Plan(method)

    groups = [channel_group(gm, inputs, [p for p in (s.gate, s.up) if p is not None], s.down, calib) for s in mlps]
    scores = [score(g) for g in groups]
    outliers = [outlier_share(g) for g in groups] if config.allocation == "outlier" else None
    for site, group, s, n in zip(mlps, groups, scores, allocate(scores, config.mlp_ratio, config.allocation, outliers)):
        order = s.argsort()
        removed, keep = order[:n], order[n:].sort().values
        plan.mlp.append(MLPPlan(site.layer, site.intermediate_size, keep.tolist(),
                                {"gate": weight_name(site.gate.weight) if site.gate else None,
                                 "up": weight_name(site.up.weight), "down": weight_name(site.down.weight)},
                                compensation(group, removed, config.BIAS_COMPENSATION),
                                {"gate": site.gate.rows[0], "up": site.up.rows[0]} if site.fused else None))

    head_groups, units = [], []
    for site in heads:
        # per-head (C,) channel views: q rows and o columns of head h are channels h*hd .. (h+1)*hd
        group = channel_group(gm, inputs, [site.q], site.o, calib)
        head_groups.append(group)
        channel = score(group)  # (H * hd,)
        units.append(head_units(channel.view(site.num_heads, site.head_dim).sum(1), site.num_kv_heads,
                                 config.head_unit))
    outliers = [outlier_share(g) for g in head_groups] if config.allocation == "outlier" else None
    counts = allocate([u[0] for u in units], config.head_ratio, config.allocation, outliers)
    for site, group, (unit_scores, unit_heads), n in zip(heads, head_groups, units, counts):
        dropped = sorted(h for k in unit_scores.argsort()[:n].tolist() for h in unit_heads[k])
        keep = [h for h in range(site.num_heads) if h not in dropped]
        group_size = site.num_heads // site.num_kv_heads
        keep_kv = sorted({h // group_size for h in keep})
        channels = head_channels(dropped, site.head_dim)
        plan.heads.append(HeadPlan(site.layer, site.num_heads, site.num_kv_heads, site.head_dim, keep, keep_kv,
                                   {k: weight_name(getattr(site, k).weight) for k in ("q", "k", "v", "o")},
                                   compensation(group, channels, config.BIAS_COMPENSATION)))
    return plan
