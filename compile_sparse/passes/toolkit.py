"""Graph-editing helpers the passes share: weights as tensors, new buffers, forward walks, the
size arguments of views, and where to insert a node."""

from __future__ import annotations

import operator
from typing import Any, Sequence

import torch
import torch.fx as fx

from .._torch_internals import parameter_name
from ..analysis import LinearOp, as_linear, example_value
from ..analysis.ops import op_name

SIZE_OPS = {"view", "reshape", "expand", "_unsafe_view"}
MAX_WALK = 64  # nodes visited by a forward walk


def weight_value(gm: fx.GraphModule, node: fx.Node, inputs: Sequence[Any]) -> torch.Tensor:
    """The real tensor of a weight node: a placeholder's example input or a get_attr buffer."""
    if node.op == "get_attr":
        return operator.attrgetter(node.target)(gm)  # a dotted path in a torch.fx trace: "mlp.down.weight"
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return inputs[placeholders.index(node)]


def out_in(linear: LinearOp, weight: torch.Tensor) -> torch.Tensor:
    """The weight as (out, in), whatever its stored layout; for a part of a fused projection, its
    rows only."""
    weight = weight if linear.weight_layout == "out_in" else weight.t()
    return weight if linear.rows is None else weight[linear.rows[0]:linear.rows[1]]


def weight_name(node: fx.Node) -> str:
    """The parameter name a weight node stands for (its buffer name for get_attr), else the node's name."""
    if node.op == "placeholder":
        return parameter_name(node) or node.name
    return str(node.target) if node.op == "get_attr" else node.name


def add_buffer(gm: fx.GraphModule, name: str, value: torch.Tensor) -> fx.Node:
    """A get_attr node, at the top of the graph, for a new buffer holding ``value``."""
    target = f"pruned_{name}".replace(".", "_")
    gm.register_buffer(target, value.detach().clone().contiguous())
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first):
        return gm.graph.get_attr(target)


def forward_nodes(start: fx.Node, stop: fx.Node) -> list[fx.Node]:
    """Nodes reached from ``start`` through users, up to (not past) ``stop`` or another projection."""
    seen, queue, found = {start}, [start], []
    while queue and len(seen) < MAX_WALK:
        node = queue.pop(0)
        for user in node.users:
            if user in seen or user is stop or user.op == "output" or as_linear(user) is not None:
                continue
            seen.add(user)
            found.append(user)
            queue.append(user)
    return found


def size_args(node: fx.Node) -> tuple[list, bool]:
    """The size arguments of a view / reshape / expand, and whether they are one list argument."""
    flat = len(node.args) == 2 and isinstance(node.args[1], (list, tuple))
    return list(node.args[1] if flat else node.args[1:]), flat


def size_rewrites(start: fx.Node, stop: fx.Node, sizes: dict[int, int],
                  repeats: dict[int, int] | None = None) -> list[tuple[fx.Node, list]]:
    """New size arguments for the view / reshape / expand nodes between ``start`` and ``stop``
    that carry an old size (``sizes``: old -> new), as (node, new sizes).

    A view / reshape size is rewritten where the node's recorded output has that old size on the
    same axis; two candidates on one node are ambiguous and refused. An expand keeps its
    non-broadcast axes as -1 (the input's size, whatever it becomes) and maps the broadcast axes by
    ``repeats`` (old -> new repeat count: GQA's repeat_kv)."""
    rewrites = []
    for node in forward_nodes(start, stop):
        if op_name(node) not in SIZE_OPS:
            continue
        args, _ = size_args(node)
        if not all(isinstance(a, int) for a in args):
            continue  # symbolic sizes come from the inputs' own shapes, which pruning does not change
        new = list(args)
        if op_name(node) == "expand":
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


def apply_size_rewrites(rewrites: list[tuple[fx.Node, list]]) -> None:
    """Give each node its new size arguments (as ``size_rewrites`` computed them)."""
    for node, sizes in rewrites:
        _, flat = size_args(node)
        node.args = (node.args[0], type(node.args[1])(sizes)) if flat else (node.args[0], *sizes)


def last_of(graph: fx.Graph, nodes: Sequence[Any]) -> fx.Node:
    """The node of ``nodes`` (non-nodes ignored) that comes last in ``graph``."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    return max((n for n in nodes if isinstance(n, fx.Node)), key=order.__getitem__)


def inserting_after_all(graph: fx.Graph, nodes: Sequence[Any]):
    """Context: new nodes go, in the order they are made, right after the last of ``nodes``
    (``graph.inserting_after`` would put each new node before the previous one)."""
    return graph.inserting_before(last_of(graph, nodes).next)


def output_node(graph: fx.Graph) -> fx.Node:
    return next(n for n in reversed(graph.nodes) if n.op == "output")


def _mutates(node: fx.Node) -> bool:
    """An in-place call (``x.add_(1)``, ``x.index_copy_(...)``): FX's own dead-code elimination
    drops such a call_method when nothing reads its result."""
    name = op_name(node)
    return name.endswith("_") and not name.endswith("__")


def remove_dead_code(gm: fx.GraphModule) -> None:
    """``eliminate_dead_code`` that keeps in-place calls (a StaticCache's index_copy_, its counter's
    add_): they act through their inputs, not their results."""
    for node in reversed(list(gm.graph.nodes)):
        if not node.users and not node.is_impure() and not _mutates(node) and node.op != "output":
            gm.graph.erase_node(node)
