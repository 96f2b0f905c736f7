"""MLP regions: projection -> pointwise activation (gated or plain) -> projection."""

from __future__ import annotations

import torch.fx as fx

from .ops import ACTIVATIONS, MAX_SEARCH, POINTWISE, layer_index, module_path, op_name, tensor_inputs
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
        linear = as_linear(node)
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
        layer=ordinal if layer is None else layer, module_path=path, gated=gate is not None,
        activation=_activation_name(acts), hidden_size=up.in_features, intermediate_size=down.in_features,
        up=up, gate=gate, down=down,
    )


def _split_gate(ups: list[LinearOp]) -> tuple[LinearOp | None, LinearOp]:
    """In a gated MLP the gate is the projection whose output passes an activation."""
    def activated(linear: LinearOp) -> bool:
        seen, stack = set(), list(linear.node.users)
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

