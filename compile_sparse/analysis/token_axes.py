"""Token (sequence) axes: where the tokens of a ``length``-token input run through a graph.

The rules are a table: one small function per op (or op kind) that maps the token axes of a node's
inputs to the token axes of its value; an op without a rule that reads tokens leaves its value
untraced (None), and a pass must refuse to rewrite through it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .ops import (CREATION, ELEMENTWISE, LIKE, MATMUL, NO_TENSOR, REDUCTIONS, RESHAPES, arg_of, example_value,
                  is_parameter, op_name, shape_of)


@dataclass
class TokenAxes:
    """Where the tokens of a ``length``-token input run through a graph.

    ``axes[node]``: the axes of the node's value that index tokens (``()`` for none), or None
    (untraced) when the node reads tokens through an op whose effect on them is not understood.
    ``reductions[node]``: the token axis a sum / mean / ... reduces (of its input).
    ``selections[node]``: (token axis, index) for a getitem that keeps part of a token axis.
    """

    length: int
    axes: dict[fx.Node, tuple[int, ...] | None] = field(default_factory=dict)
    reductions: dict[fx.Node, int] = field(default_factory=dict)
    selections: dict[fx.Node, tuple[int, Any]] = field(default_factory=dict)


def _full_slice(index: slice, size: int) -> bool:
    return index.start in (None, 0) and (index.stop is None or index.stop >= size) and index.step in (None, 1)


def _reshape_axis(in_shape: tuple, out_shape: tuple, axis: int) -> int | None:
    """The output axis a reshape carries input axis ``axis`` to: same size, same number of elements
    before and after it. None when the axis is merged or split."""
    before, after = math.prod(in_shape[:axis]), math.prod(in_shape[axis + 1:])
    for out_axis, size in enumerate(out_shape):
        if size == in_shape[axis] and math.prod(out_shape[:out_axis]) == before \
                and math.prod(out_shape[out_axis + 1:]) == after:
            return out_axis
    return None


def _getitem_axes(node: fx.Node, axes: tuple[int, ...], shape: tuple, length: int,
                  result: TokenAxes) -> tuple[int, ...] | None:
    """Token axes after ``x[index]``; records a selection when the index keeps part of a token axis.
    A slice of a non-token axis down to ``length`` from its start makes a token axis (a buffer of
    positions or a mask sliced to the sequence: ``bias[:, :, :T, :T]``)."""
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    if any(isinstance(i, fx.Node) for i in index):
        if not all(isinstance(i, fx.Node) for i in index) or len(index) != len(shape):
            return None if axes else ()
        out_rank = len(shape_of(node) or ())
        found = set()  # advanced indexing over every axis: the result is the indices' broadcast shape
        for i in index:
            sub = result.axes.get(i, ())
            if sub is None:
                return None
            found.update(a + out_rank - len(shape_of(i) or ()) for a in sub)
        return tuple(sorted(found))
    consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for i in index:
        expanded.extend([slice(None)] * (len(shape) - consumed) if i is Ellipsis else [i])
    expanded += [slice(None)] * (len(shape) - sum(1 for i in expanded if i is not None))
    out: list[int] = []
    in_axis = out_axis = 0
    for i in expanded:
        if i is None:
            out_axis += 1
            continue
        if isinstance(i, int):
            if in_axis in axes:
                result.selections[node] = (in_axis, i)
            in_axis += 1
            continue
        if not isinstance(i, slice):
            return None
        if in_axis in axes:
            if _full_slice(i, shape[in_axis]):
                out.append(out_axis)
            else:
                result.selections[node] = (in_axis, i)
        elif i.start in (None, 0) and shape[in_axis] != length and (shape_of(node) or ())[out_axis] == length:
            out.append(out_axis)
        in_axis += 1
        out_axis += 1
    return tuple(out)


@dataclass
class _Op:
    """One node as a token-axis rule sees it: its shape, its first tensor input (``source``) and
    the token axes of every tensor input (``known``)."""

    node: fx.Node
    shape: tuple | None
    known: dict[fx.Node, tuple[int, ...]]
    result: TokenAxes

    @property
    def source(self) -> fx.Node | None:
        first = self.node.args[0] if self.node.args else None
        return first if isinstance(first, fx.Node) else None

    @property
    def src_axes(self) -> tuple[int, ...]:
        return self.known.get(self.source, ()) if self.source is not None else ()

    @property
    def src_shape(self) -> tuple | None:
        return shape_of(self.source) if self.source is not None else None


Axes = tuple[int, ...] | None


def _getitem(op: _Op) -> Axes:
    if isinstance(example_value(op.source), (tuple, list)):
        return op.src_axes  # an element of a split: the split's rule decided
    return _getitem_axes(op.node, op.src_axes, op.src_shape, op.result.length, op.result)


def _reshape(op: _Op) -> Axes:
    mapped = [_reshape_axis(op.src_shape, op.shape, a) for a in op.src_axes]
    return None if None in mapped else tuple(mapped)


def _elementwise(op: _Op) -> Axes:
    """Broadcasting: each input's token axis lands where it aligns with the output's (same size)."""
    out = set()
    for n, axes in op.known.items():
        n_shape = shape_of(n) or ()
        for a in axes:
            b = a + len(op.shape) - len(n_shape)
            if op.shape[b] == n_shape[a]:
                out.add(b)
    return tuple(sorted(out))


def _norm(op: _Op) -> Axes:
    """layer_norm / rms_norm: tokens must not be among the normalized (last) axes."""
    normalized = len(op.node.args[1]) if isinstance(op.node.args[1], (list, tuple)) else 1
    if any(a >= len(op.src_shape) - normalized for a in op.src_axes):
        return None
    return _elementwise(op)


def _transpose(op: _Op) -> Axes:
    d0, d1 = (d % len(op.shape) for d in op.node.args[1:3])
    swap = {d0: d1, d1: d0}
    return tuple(sorted(swap.get(a, a) for a in op.src_axes))


def _permute(op: _Op) -> Axes:
    dims = op.node.args[1] if isinstance(op.node.args[1], (list, tuple)) else op.node.args[1:]
    order = [d % len(op.shape) for d in dims]
    return tuple(sorted(order.index(a) for a in op.src_axes))


def _embedding(op: _Op) -> Axes:  # (..., T) ids -> (..., T, D)
    return op.src_axes


def _linear(op: _Op) -> Axes:  # tokens must not be the contracted (feature) axis
    return None if len(op.src_shape) - 1 in op.src_axes else op.src_axes


def _addmm(op: _Op) -> Axes:  # addmm(bias, x (N, in), W): tokens along x's rows go through, along its features do not
    rows = op.known.get(op.node.args[1], ())
    return None if op.known.get(op.node.args[0]) or 1 in rows else rows


def _matmul(op: _Op) -> Axes:
    a, b = op.node.args[0], op.node.args[1]
    a_shape, b_shape = shape_of(a) or (), shape_of(b) or ()
    if len(a_shape) < 2 or len(b_shape) < 2:
        return None
    rank, out = len(op.shape), set()
    for ax in op.known.get(a, ()):
        if ax != len(a_shape) - 1:  # the contracted axis (p @ v sums over keys) leaves no token axis
            out.add(rank - 2 if ax == len(a_shape) - 2 else ax + rank - len(a_shape))
    for ax in op.known.get(b, ()):
        if ax != len(b_shape) - 2:
            out.add(rank - 1 if ax == len(b_shape) - 1 else ax + rank - len(b_shape))
    return tuple(sorted(out))


def _cat(op: _Op) -> Axes:
    dim = arg_of(op.node, 1, "dim", 0) % len(op.shape)
    out = set()
    for n, axes in op.known.items():
        if len(shape_of(n) or ()) == len(op.shape):
            out.update(a for a in axes if a != dim or op.shape[dim] == op.result.length)
    return tuple(sorted(out))


def _gather(op: _Op) -> Axes:
    dim = arg_of(op.node, 1, "dim") % len(op.shape)
    if any(a != dim for a in op.src_axes):
        return None
    return op.known.get(arg_of(op.node, 2, "index"), ())


def _reduction(op: _Op) -> Axes:
    dims = arg_of(op.node, 1, "dim", None)
    rank = len(op.src_shape)
    dims = range(rank) if dims is None else ([dims] if isinstance(dims, int) else list(dims))
    dims = {d % rank for d in dims}
    keepdim = bool(arg_of(op.node, 2, "keepdim", False))
    reduced = [a for a in op.src_axes if a in dims]
    if reduced:
        op.result.reductions[op.node] = reduced[0]
    return tuple(a if keepdim else a - sum(1 for d in dims if d < a) for a in op.src_axes if a not in dims)


def _split(op: _Op) -> Axes:
    dim = arg_of(op.node, 2, "dim", 0) % len(op.src_shape)
    return None if dim in op.src_axes else op.src_axes


# op name -> rule, for nodes with a token axis among their inputs; an op missing here leaves its
# value untraced. Later entries win: a reshape is a reshape, even though views are pointwise to an MLP.
RULES = {
    **{name: _reduction for name in REDUCTIONS}, **{name: _matmul for name in MATMUL},
    "transpose": _transpose, "swapaxes": _transpose, "permute": _permute, "embedding": _embedding,
    "linear": _linear, "addmm": _addmm, "cat": _cat, "gather": _gather,
    "split": _split, "chunk": _split, "split_with_sizes": _split,
    **{name: _elementwise for name in ELEMENTWISE}, "layer_norm": _norm, "rms_norm": _norm, "group_norm": _elementwise,
    **{name: _reshape for name in RESHAPES}, "getitem": _getitem,
}
_NO_SHAPE = {"split", "chunk", "split_with_sizes"}  # their value is a tuple of tensors


def _untouched(op: _Op) -> Axes:
    """A node none of whose inputs carries tokens: tokens start here only at a slice of a buffer
    to the sequence length, or at a concatenation that builds the sequence ([CLS] + patches)."""
    name = op_name(op.node)
    if name == "getitem" and op.src_shape is not None:
        return _getitem_axes(op.node, (), op.src_shape, op.result.length, op.result)
    if name == "cat" and op.shape is not None:
        dim = arg_of(op.node, 1, "dim", 0) % len(op.shape)
        return (dim,) if op.shape[dim] == op.result.length else ()
    return ()


def _node_token_axes(node: fx.Node, result: TokenAxes) -> Axes:
    """The token axes of one node's value from its inputs' (see TokenAxes)."""
    length, name, shape = result.length, op_name(node), shape_of(node)
    inputs = [n for n in node.all_input_nodes if isinstance(example_value(n), (torch.Tensor, tuple, list))]
    known = {n: result.axes.get(n, ()) for n in inputs}
    if any(a is None for a in known.values()):
        return None
    if node.op == "placeholder":
        return () if is_parameter(node) or shape is None else tuple(i for i, s in enumerate(shape) if s == length)
    if node.op not in ("call_function", "call_method") or name in NO_TENSOR:
        return ()
    op = _Op(node, shape, known, result)
    if name in LIKE:
        return known.get(node.args[0], ())
    if name in CREATION:
        return tuple(i for i, s in enumerate(shape or ()) if s == length and length > 1)
    if not any(known.values()):
        return _untouched(op)
    if shape is None and name not in _NO_SHAPE and not (name == "getitem"
                                                        and isinstance(example_value(op.source), (tuple, list))):
        return None
    rule = RULES.get(name)
    return rule(op) if rule is not None else None


def token_axes(gm: fx.GraphModule, length: int) -> TokenAxes:
    """Trace the token axis of a ``length``-token input through ``gm`` (see TokenAxes).

    Tokens start at inputs with an axis of that length (``input_ids``, an attention mask), at
    ``arange(length)`` and tensors created with that length, at buffers sliced to it, and at a
    concatenation that builds a sequence of that length ([CLS] + patch tokens). They are followed
    through elementwise ops, reshapes that keep the axis whole, transposes, projections,
    embeddings, matmuls and attention, concatenation and indexing; any other op that reads them
    leaves its value untraced (None), and a pass must refuse to rewrite through it."""
    result = TokenAxes(length)
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        result.axes[node] = _node_token_axes(node, result)
    return result
