"""MLP regions: projection -> pointwise activation (gated or plain) -> projection."""

from __future__ import annotations

import dataclasses
import re

import torch.fx as fx

from .ops import (ACTIVATIONS, MAX_SEARCH, POINTWISE, arg_of, is_parameter, layer_index, module_path, op_name, shape_of,
                  stack_of, tensor_inputs)
from .sites import LinearOp, MLPSite, SkippedRegion, as_linear


def _mlp_inputs(down: LinearOp) -> tuple[list[LinearOp], set[str]] | None:
    """Walk back from the down projection's input through pointwise ops only. Returns the
    projections reached and the activations passed, or None when anything else feeds it."""
    ups: dict[fx.Node, LinearOp] = {}
    acts: set[str] = set()
    seen, stack = set(), [down.input]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        linear = as_linear(node) or fused_part(node)
        if linear is not None:
            ups[node] = linear
            continue
        name = op_name(node)
        if name not in POINTWISE and name not in ACTIVATIONS:
            return None
        if name in ACTIVATIONS:
            acts.add(ACTIVATIONS[name])
        elif name == "tanh":
            acts.add("tanh")
        if len(seen) > MAX_SEARCH:
            return None
        stack.extend(tensor_inputs(node))
    return list(ups.values()), acts


def fused_part(node: fx.Node) -> LinearOp | None:
    """``getitem(chunk(linear(x), n, dim=-1), i)`` (or ``split`` into equal or listed sizes along
    the last axis) as the LinearOp of rows [start, stop) of the projection; else None."""
    if op_name(node) != "getitem" or not isinstance(node.args[1], int):
        return None
    source = node.args[0]
    if not isinstance(source, fx.Node) or op_name(source) not in ("chunk", "split", "split_with_sizes"):
        return None
    linear = as_linear(source.args[0])
    shape = shape_of(source.args[0])
    dim = arg_of(source, 2, "dim", 0)
    if linear is None or shape is None or dim not in (-1, len(shape) - 1):
        return None
    sizes = arg_of(source, 1, "chunks" if op_name(source) == "chunk" else "split_size_or_sections")
    if op_name(source) == "chunk":
        sizes = [linear.out_features // sizes] * sizes if linear.out_features % sizes == 0 else None
    elif isinstance(sizes, int):
        sizes = [sizes] * (linear.out_features // sizes) if linear.out_features % sizes == 0 else None
    if not isinstance(sizes, (list, tuple)) or not all(isinstance(n, int) for n in sizes) \
            or sum(sizes) != linear.out_features or not 0 <= node.args[1] < len(sizes):
        return None
    start = sum(sizes[:node.args[1]])
    return dataclasses.replace(linear, out_features=sizes[node.args[1]], rows=(start, start + sizes[node.args[1]]),
                               part=node)


def _activation_name(acts: set[str]) -> str:
    if acts == {"tanh"}:
        return "gelu_tanh"  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), written out
    if not acts:
        return "none"
    return "+".join(sorted(acts))


def _same_input(a: LinearOp, b: LinearOp) -> bool:
    def root(n: fx.Node) -> fx.Node:
        while op_name(n) in ("view", "reshape", "contiguous") and isinstance(n.args[0], fx.Node):
            n = n.args[0]
        return n
    return root(a.input) is root(b.input)


def mlp_site(down: LinearOp, ordinal: int) -> MLPSite | SkippedRegion | None:
    walked = _mlp_inputs(down)
    if walked is None:
        return None
    ups, acts = walked
    if not ups or all(u.out_features != down.in_features for u in ups):
        return None
    path = module_path(down.node)
    if len(ups) > 2 or any(u.out_features != down.in_features for u in ups):
        return SkippedRegion("mlp", down.node.name, path,
                             f"{len(ups)} projections of widths {[u.out_features for u in ups]} feed "
                             f"{down.weight.name} (in {down.in_features}): not a plain or gated MLP")
    if len(ups) == 2 and not _same_input(*ups):
        return SkippedRegion("mlp", down.node.name, path, "the two projections of a gated MLP read different inputs")
    if len(ups) == 2:
        gate, up = _split_gate(ups)
        if gate is None:
            return SkippedRegion("mlp", down.node.name, path, "no activation on either branch of a two-projection MLP")
    else:
        gate, up = None, ups[0]
    layer = layer_index(down.node, down.weight)
    return MLPSite(
        layer=ordinal if layer is None else layer, module_path=path, stack=stack_of(down.node), gated=gate is not None,
        activation=_activation_name(acts), hidden_size=up.in_features, intermediate_size=down.in_features,
        up=up, gate=gate, down=down,
    )


def _split_gate(ups: list[LinearOp]) -> tuple[LinearOp | None, LinearOp]:
    """In a gated MLP the gate is the projection whose output passes an activation."""
    def activated(linear: LinearOp) -> bool:
        seen, stack = set(), list(linear.output.users)
        while stack:
            node = stack.pop()
            if node in seen or len(seen) > 8:
                continue
            seen.add(node)
            if op_name(node) in ACTIVATIONS or op_name(node) == "tanh":
                return True
            if op_name(node) in ("mul", "mul_"):
                continue  # the gate product: stop before the other branch
            stack.extend(node.users)
        return False
    first, second = ups
    if activated(first) and not activated(second):
        return first, second
    if activated(second) and not activated(first):
        return second, first
    return None, first


def expert_regions(graph: fx.Graph) -> list[SkippedRegion]:
    """Mixture-of-experts MLPs: per layer, the 3-D parameters (experts, out, in) that grouped or
    batched matmuls read behind a router, as one region each (kind "experts") with the expert
    count and shapes. Left as they are: the passes prune 2-D projections only."""
    by_layer: dict[int | None, list[fx.Node]] = {}
    for node in graph.nodes:
        shape = shape_of(node) if is_parameter(node) else None
        if shape is not None and len(shape) == 3 and shape[0] > 1 and _multiplied(node):
            by_layer.setdefault(layer_index(node, node), []).append(node)
    regions = []
    for layer, params in by_layer.items():
        user = next(iter(params[0].users), params[0])
        shapes = ", ".join(f"{_short(p.name)} {tuple(shape_of(p))}" for p in params)
        regions.append(SkippedRegion(
            "experts", user.name, module_path(user),
            f"{shape_of(params[0])[0]} experts behind a router ({shapes}): left as they are (structured pruning "
            "slices 2-D projections; expert MLPs are not pruned)", expected=True, layer=layer))
    return regions


def _multiplied(param: fx.Node) -> bool:
    """A matrix product reads the parameter, directly or through a transpose or an index."""
    users = list(param.users)
    users += [u for user in users if op_name(user) in ("transpose", "getitem", "t") for u in user.users]
    return any("mm" in op_name(u) or op_name(u) in ("matmul", "linear", "einsum") for u in users)


def _short(name: str) -> str:
    """``l_self_modules_..._experts_parameters_gate_up_proj_`` -> ``experts.gate_up_proj``."""
    return re.sub(r"^.*_modules_([a-z_]+?)_parameters_(.+?)_?$", r"\1.\2", name)
