"""The op vocabulary of the analysis and the node helpers every pass shares.

Ops are matched by plain target and method names, so ``torch.f(x)`` and ``x.f()`` both match, at
the torch level Dynamo captures (never ATen), so one analysis serves every device.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.fx as fx

from .._torch_internals import constant_size


def op_name(node: fx.Node) -> str:
    """The op name of a call node: function __name__ or method name ('' for other nodes)."""
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return str(node.target)
    return ""


SOFTMAX = {"softmax"}
MATMUL = ("matmul", "bmm")
# Pointwise ops an MLP's intermediate activation may pass through between the up and down projections.
POINTWISE = {
    "mul", "add", "sub", "truediv", "div", "neg", "pow", "tanh", "sigmoid", "silu", "gelu", "relu",
    "relu6", "leaky_relu", "elu", "selu", "celu", "mish", "hardswish", "hardsigmoid", "softplus",
    "erf", "exp", "sqrt", "rsqrt", "abs", "clamp", "square", "dropout", "to", "type", "float",
    "half", "bfloat16", "contiguous", "view", "reshape", "clone",
    "mul_", "add_", "sigmoid_", "relu_", "gelu_", "silu_",
}
ACTIVATIONS = {
    "silu": "silu", "silu_": "silu", "gelu": "gelu", "gelu_": "gelu", "relu": "relu", "relu_": "relu",
    "relu6": "relu6", "leaky_relu": "leaky_relu", "elu": "elu", "selu": "selu", "mish": "mish",
    "hardswish": "hardswish", "softplus": "softplus", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
}
# Ops that end a backward search for the projection feeding q / k / v: crossing them would leave
# the attention block.
BOUNDARY = {"layer_norm", "group_norm", "rms_norm", "embedding", "scaled_dot_product_attention",
            "softmax", "mean", "sum", "var"}
MAX_SEARCH = 64  # nodes visited per backward or forward search
# Ops an attention output or a token axis passes through unchanged element by element.
ELEMENTWISE = (POINTWISE | set(ACTIVATIONS) | {
    "cos", "sin", "log", "exp", "ge", "gt", "le", "lt", "eq", "ne", "and_", "or_", "logical_and", "logical_or",
    "logical_not", "bitwise_not", "invert", "where", "masked_fill", "softmax", "log_softmax", "expand", "expand_as",
    "type_as", "detach", "int", "long", "bool", "clamp_min", "clamp_max", "minimum", "maximum", "floordiv",
    "floor_divide", "remainder", "mod", "scaled_dot_product_attention",
})
RESHAPES = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
REDUCTIONS = {"sum", "mean", "amax", "amin", "var", "std", "logsumexp", "prod", "norm"}
CREATION = {"arange", "ones", "zeros", "full", "empty", "new_ones", "new_zeros", "new_full", "new_empty", "tensor"}
NO_TENSOR = {"_log_api_usage_once", "size", "dim", "numel"}
LIKE = {"ones_like", "zeros_like", "full_like", "empty_like", "rand_like", "randn_like"}


def example_value(node: Any) -> Any:
    """The example value Dynamo (or FakeTensorProp) recorded for a node, or None."""
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def shape_of(node: Any) -> tuple | None:
    """The shape of a node's tensor value, or None."""
    value = example_value(node)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def static_size(size: Any) -> int | str:
    """An int for a concrete size, the symbolic expression as a string otherwise. A SymInt is
    never turned into an int: that would add a guard on its value and recompile for every length."""
    if isinstance(size, torch.SymInt):
        constant = constant_size(size)
        return constant if constant is not None else str(size)
    try:
        return int(size)
    except (TypeError, ValueError):
        return str(size)


def arg_of(node: fx.Node, index: int, key: str, default: Any = None) -> Any:
    """Argument ``index`` of a call, or its keyword ``key``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(key, default)


def is_parameter(node: Any) -> bool:
    """True for a node that carries a parameter or buffer: Dynamo's placeholders named
    ``L_self_modules_..._parameters_weight_`` / ``..._buffers_...``, or ``get_attr`` nodes."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "get_attr":
        return True
    return node.op == "placeholder" and bool(re.search(r"_(parameters|buffers)_", node.name))


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """Inputs that carry tensors (or tuples of them, like a split's result), not sizes."""
    return [n for n in node.all_input_nodes
            if isinstance(example_value(n), (torch.Tensor, tuple, list)) or n.op == "get_attr"]


def module_path(node: fx.Node) -> str:
    """The dotted path of the innermost module the node was traced in ('' when unknown)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path if isinstance(path, str) else str(path)


def layer_index(node: fx.Node, weight: fx.Node | None) -> int | None:
    """The index of the outermost ModuleList entry the node lives in (``layers.3`` / ``h[3]``; T5's
    ``block.0.layer.1`` is block 0), else from the weight placeholder's name (``..._modules_3_modules_...``)."""
    found = re.findall(r"(?:\.|\[)(\d+)(?:\]|\.|$)", module_path(node))
    if found:
        return int(found[0])
    if weight is not None:
        found = re.findall(r"_modules_(\d+)_", weight.name)
        if found:
            return int(found[0])
    return None


def stack_of(node: fx.Node) -> str:
    """"encoder" or "decoder" when the node's module path says so (an encoder-decoder model), else ""."""
    parts = module_path(node).replace("[", ".").split(".")
    return next((part for part in parts if part in ("encoder", "decoder")), "")


def graph_outputs(graph: fx.Graph) -> set[fx.Node]:
    """The nodes the graph returns."""
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    result: set[fx.Node] = set()
    fx.node.map_arg(out.args, lambda n: result.add(n))
    return result

