"""Find the attention and MLP regions of an FX graph captured by Dynamo.

Everything here reads the torch-level graph (``torch._C._nn.linear``, ``scaled_dot_product_attention``,
``torch.matmul``, ``softmax``), never ATen, so one analysis serves every device. A site is recorded
only when every piece the passes need was found; a region that looks like attention or an MLP but
is only partly understood becomes a ``SkippedRegion`` with the reason, and no pass ever touches it.
"""

from __future__ import annotations

import logging
import math
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx

log = logging.getLogger("compile_sparse")

# ---------------------------------------------------------------------------------------------
# Op classification (plain targets and method names, so both `torch.f(x)` and `x.f()` match).
# ---------------------------------------------------------------------------------------------


def _name(node: fx.Node) -> str:
    """The op name of a call node: function __name__ or method name ('' for other nodes)."""
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return str(node.target)
    return ""


_SOFTMAX = {"softmax"}
_MATMUL = ("matmul", "bmm")
# Pointwise ops an MLP's intermediate activation may pass through between the up and down projections.
_POINTWISE = {
    "mul", "add", "sub", "truediv", "div", "neg", "pow", "tanh", "sigmoid", "silu", "gelu", "relu",
    "relu6", "leaky_relu", "elu", "selu", "celu", "mish", "hardswish", "hardsigmoid", "softplus",
    "erf", "exp", "sqrt", "rsqrt", "abs", "clamp", "square", "dropout", "to", "type", "float",
    "half", "bfloat16", "contiguous", "view", "reshape", "clone",
    "mul_", "add_", "sigmoid_", "relu_", "gelu_", "silu_",
}
_ACTIVATIONS = {
    "silu": "silu", "silu_": "silu", "gelu": "gelu", "gelu_": "gelu", "relu": "relu", "relu_": "relu",
    "relu6": "relu6", "leaky_relu": "leaky_relu", "elu": "elu", "selu": "selu", "mish": "mish",
    "hardswish": "hardswish", "softplus": "softplus", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
}
# Ops that end a backward search for the projection feeding q / k / v: crossing them would leave
# the attention block.
_BOUNDARY = {"layer_norm", "group_norm", "rms_norm", "embedding", "scaled_dot_product_attention",
             "softmax", "mean", "sum", "var"}
_MAX_SEARCH = 64  # nodes visited per backward or forward search


def example_value(node: Any) -> Any:
    """The example value Dynamo (or FakeTensorProp) recorded for a node, or None."""
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def _shape(node: Any) -> tuple | None:
    value = example_value(node)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _static(size: Any) -> int | str:
    """An int for a concrete size, the symbolic expression as a string otherwise. A SymInt is
    never turned into an int: that would add a guard on its value and recompile for every length."""
    if isinstance(size, torch.SymInt):
        constant = size.node.maybe_as_int()
        return constant if constant is not None else str(size)
    try:
        return int(size)
    except (TypeError, ValueError):
        return str(size)


def _arg(node: fx.Node, index: int, key: str, default: Any = None) -> Any:
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


# ---------------------------------------------------------------------------------------------
# Sites
# ---------------------------------------------------------------------------------------------


@dataclass
class LinearOp:
    """A projection ``y = x @ W^T + b``: ``F.linear`` (W is (out, in)), or HF's Conv1D
    ``addmm(b, x2d, W)`` and ``matmul(x, W)`` (W is (in, out))."""

    node: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    in_features: int
    out_features: int
    weight_layout: str  # "out_in" or "in_out"

    @property
    def input(self) -> fx.Node:
        return self.node.args[1] if _name(self.node) == "addmm" else self.node.args[0]

    def num_params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)


def as_linear(node: Any) -> LinearOp | None:
    """The node as a LinearOp if it is a projection by a parameter, else None."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return None
    name = _name(node)
    if name == "linear":
        weight, bias = node.args[1], _arg(node, 2, "bias")
        layout = "out_in"
    elif name == "addmm" and node.op == "call_function":
        bias, weight = node.args[0], node.args[2]
        layout = "in_out"
    elif name in ("matmul", "mm") and len(node.args) == 2 and is_parameter(node.args[1]):
        weight, bias = node.args[1], None
        layout = "in_out"
    else:
        return None
    shape = _shape(weight)
    if not is_parameter(weight) or shape is None or len(shape) != 2:
        return None
    out_f, in_f = (shape if layout == "out_in" else shape[::-1])
    return LinearOp(node, weight, bias if isinstance(bias, fx.Node) else None, int(in_f), int(out_f), layout)


@dataclass
class CacheSlot:
    """Where one of K or V meets the KV cache.

    ``kind`` is "concat" (DynamicCache: ``torch.cat([past, new], dim=seq_axis)``) or "index_copy"
    (StaticCache: ``past.index_copy_(seq_axis, positions, new)``). ``input`` is the past tensor (a
    placeholder, or the node that creates an empty cache on the first call), ``update`` the op that
    appends, ``output`` the graph output that hands the updated cache back (for "concat", the cat;
    for "index_copy", the cache itself when the graph returns it, else None: updated in place).
    """

    kind: str
    input: fx.Node
    update: fx.Node
    output: fx.Node | None
    seq_axis: int


@dataclass
class AttentionSite:
    """One attention block.

    q / k / v / o are the projections (one shared LinearOp when qkv is fused); shapes at the
    attention op are q (B, num_heads, q_len, head_dim) and k, v (B, heads, kv_len, head_dim) (k is
    transposed in the matmul form), with the sequence on ``seq_axis`` of k and v in that layout.
    """

    layer: int
    node: fx.Node  # the scaled_dot_product_attention call, or the softmax of the matmul form
    form: str  # "sdpa" or "matmul_softmax"
    module_path: str
    q: LinearOp
    k: LinearOp
    v: LinearOp
    o: LinearOp | None
    qkv_fused: bool
    num_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool | None
    q_len: int | str
    kv_len: int | str
    seq_axis: int
    mask: fx.Node | None
    query: fx.Node  # q at the attention op, (B, num_heads, q_len, head_dim)
    key: fx.Node  # k at the attention op: (B, heads, kv_len, head_dim); (B, heads, head_dim, kv_len) in the matmul form
    scale: float  # the softmax scale: SDPA's scale argument, else 1 / sqrt(head_dim)
    k_cache: CacheSlot | None = None
    v_cache: CacheSlot | None = None

    @property
    def has_cache(self) -> bool:
        return self.k_cache is not None

    def kv_bytes_per_token(self) -> int:
        """Bytes one token adds to this layer's cache (K and V), 0 without a cache."""
        if not self.has_cache:
            return 0
        itemsize = example_value(self.k_cache.update).element_size()
        return 2 * self.num_kv_heads * self.head_dim * itemsize

    def num_params(self) -> int:
        projections = {id(p.node): p for p in (self.q, self.k, self.v, self.o) if p is not None}
        return sum(p.num_params() for p in projections.values())

    def summary(self) -> dict:
        return {
            "layer": self.layer, "form": self.form, "module": self.module_path,
            "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
            "causal": self.causal, "q_len": self.q_len, "kv_len": self.kv_len, "seq_axis": self.seq_axis,
            "qkv_fused": self.qkv_fused,
            "weights": {k: (p.weight.name if p is not None else None)
                        for k, p in (("q", self.q), ("k", self.k), ("v", self.v), ("o", self.o))},
            "cache": None if not self.has_cache else {
                "kind": self.k_cache.kind, "k_input": self.k_cache.input.name, "v_input": self.v_cache.input.name,
                "k_output": getattr(self.k_cache.output, "name", None),
                "v_output": getattr(self.v_cache.output, "name", None),
                "seq_axis": self.k_cache.seq_axis,
            },
            "params": self.num_params(), "kv_bytes_per_token": self.kv_bytes_per_token(),
        }


@dataclass
class MLPSite:
    """One MLP: ``down(act(gate(x)) * up(x))`` when gated, ``down(act(up(x)))`` when plain.
    x is (..., hidden_size); the intermediate is (..., intermediate_size)."""

    layer: int
    module_path: str
    gated: bool
    activation: str
    hidden_size: int
    intermediate_size: int
    up: LinearOp
    gate: LinearOp | None
    down: LinearOp

    def num_params(self) -> int:
        return sum(p.num_params() for p in (self.up, self.gate, self.down) if p is not None)

    def summary(self) -> dict:
        return {
            "layer": self.layer, "module": self.module_path, "gated": self.gated, "activation": self.activation,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "weights": {k: (p.weight.name if p is not None else None)
                        for k, p in (("gate", self.gate), ("up", self.up), ("down", self.down))},
            "params": self.num_params(),
        }


@dataclass
class SkippedRegion:
    """A region that looks like attention or an MLP but was not fully understood: never rewritten."""

    kind: str  # "attention" or "mlp"
    node: str
    module_path: str
    reason: str

    def summary(self) -> dict:
        return {"kind": self.kind, "node": self.node, "module": self.module_path, "reason": self.reason}


@dataclass
class GraphAnalysis:
    attention: list[AttentionSite] = field(default_factory=list)
    mlp: list[MLPSite] = field(default_factory=list)
    skipped: list[SkippedRegion] = field(default_factory=list)
    inputs: Sequence[Any] = ()  # the real tensors the graph's placeholders stand for, in order

    def summary(self) -> dict:
        return {
            "attention_sites": [s.summary() for s in self.attention],
            "mlp_sites": [s.summary() for s in self.mlp],
            "skipped": [s.summary() for s in self.skipped],
        }


class AnalysisError(Exception):
    """Raised inside the analysis when a candidate region cannot be fully understood."""


# ---------------------------------------------------------------------------------------------
# Graph helpers
# ---------------------------------------------------------------------------------------------


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """Inputs that carry tensors (or tuples of them, like a split's result), not sizes."""
    return [n for n in node.all_input_nodes
            if isinstance(example_value(n), (torch.Tensor, tuple, list)) or n.op == "get_attr"]


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path if isinstance(path, str) else str(path)


def _layer_index(node: fx.Node, weight: fx.Node | None) -> int | None:
    """The index of the ModuleList entry the node lives in (``layers.3`` / ``h[3]``), else from the
    weight placeholder's name (``..._modules_3_modules_...``)."""
    found = re.findall(r"(?:\.|\[)(\d+)(?:\]|\.|$)", _module_path(node))
    if found:
        return int(found[-1])
    if weight is not None:
        found = re.findall(r"_modules_(\d+)_", weight.name)
        if found:
            return int(found[-1])
    return None


def _graph_outputs(graph: fx.Graph) -> set[fx.Node]:
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    result: set[fx.Node] = set()
    fx.node.map_arg(out.args, lambda n: result.add(n))
    return result


def _is_empty_cache(node: fx.Node) -> bool:
    """A cache that does not exist yet: HF's ``torch.tensor([])`` / ``torch.zeros(...)`` stand-in."""
    return node.op == "call_function" and _name(node) in ("tensor", "zeros", "empty")


def _is_cache_tensor(node: fx.Node) -> bool:
    return (node.op == "placeholder" and not is_parameter(node)) or _is_empty_cache(node)


def _index_copy_into(node: fx.Node) -> fx.Node | None:
    for user in node.users:
        if _name(user) == "index_copy_" and user.args[0] is node:
            return user
    return None


@dataclass
class _Trace:
    """The projection a q / k / v tensor comes from, the path to it and the cache met on the way."""

    linear: LinearOp
    path: list[fx.Node]  # from the tensor at the attention op back to the projection
    cache: CacheSlot | None


def _trace_projection(start: fx.Node, outputs: set[fx.Node]) -> _Trace:
    """Breadth-first search backwards from ``start`` to the nearest projection by a parameter."""
    parent: dict[fx.Node, fx.Node | None] = {start: None}
    queue = deque([start])
    cache: CacheSlot | None = None
    while queue and len(parent) < _MAX_SEARCH:
        node = queue.popleft()
        linear = as_linear(node)
        if linear is not None:
            path = [node]
            while parent[path[-1]] is not None:
                path.append(parent[path[-1]])
            return _Trace(linear, path[::-1], cache)
        if node is not start and _name(node) in _BOUNDARY:
            continue
        nexts = _tensor_inputs(node)
        if _name(node) == "cat" and cache is None:
            parts = node.args[0]
            past = [p for p in parts if isinstance(p, fx.Node) and _is_cache_tensor(p)]
            if past:
                rank = len(_shape(node) or ()) or 4
                dim = _arg(node, 1, "dim", 0)
                out = node if node in outputs else None
                cache = CacheSlot("concat", past[0], node, out, dim % rank)
                nexts = [p for p in parts if isinstance(p, fx.Node) and p is not past[0]]
        if _is_cache_tensor(node) and cache is None:
            write = _index_copy_into(node)
            if write is not None:
                rank = len(_shape(node) or ()) or 4
                cache = CacheSlot("index_copy", node, write, node if node in outputs else None, write.args[1] % rank)
                nexts = [write.args[3]]
        for n in nexts:
            if n not in parent:
                parent[n] = node
                queue.append(n)
    raise AnalysisError(f"no projection by a parameter found within {_MAX_SEARCH} nodes upstream of {start.name}")


def _portion_features(trace: _Trace) -> int:
    """How many of the projection's output features feed this tensor: all of them, or the part a
    split / slice of a fused qkv projection takes."""
    full = example_value(trace.linear.node)
    for node in reversed(trace.path[:-1]):  # from the projection forwards
        value = example_value(node)
        if _name(node) == "cat":
            break
        if isinstance(value, torch.Tensor) and value.numel() < full.numel():
            return trace.linear.out_features * value.numel() // full.numel()
    return trace.linear.out_features


def _trace_output_projection(start: fx.Node) -> LinearOp | None:
    """The projection the attention output feeds, through reshapes / transposes / dropout."""
    queue, seen = deque([start]), {start}
    while queue and len(seen) < _MAX_SEARCH:
        node = queue.popleft()
        linear = as_linear(node)
        if linear is not None and node is not start:
            return linear
        if node is not start and _name(node) in _BOUNDARY:
            continue
        for user in node.users:
            if user not in seen and user.op in ("call_function", "call_method"):
                seen.add(user)
                queue.append(user)
    return None


# ---------------------------------------------------------------------------------------------
# Causality: read off the mask the graph actually builds
# ---------------------------------------------------------------------------------------------


def _evaluate(gm: fx.GraphModule, target: fx.Node, example_inputs: Sequence[Any]) -> torch.Tensor | None:
    """Evaluate ``target`` on the real example inputs when it depends on no projection (masks are
    built from positions and the padding mask): copy its ancestors into a small graph and run it."""
    ancestors: list[fx.Node] = []
    seen, stack = set(), [target]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if as_linear(node) is not None or _name(node) in ("scaled_dot_product_attention", "softmax") or len(seen) > 400:
            return None
        ancestors.append(node)
        stack.extend(node.all_input_nodes)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        return None
    graph, env = fx.Graph(), {}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in sorted(ancestors, key=order.__getitem__):
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[target])
    inputs = [example_inputs[i] for i, p in enumerate(placeholders) if p in seen]
    try:
        with torch.no_grad():
            value = fx.GraphModule(gm, graph)(*inputs)
    except Exception as err:  # a mask we cannot evaluate leaves causality unknown
        log.debug("mask %s not evaluated: %s", target.name, err)
        return None
    return value if isinstance(value, torch.Tensor) else None


def _allowed(mask: torch.Tensor, how: str) -> torch.Tensor:
    """Boolean 'may attend' from a mask used as ``how``: "bool_keep" (True = attend),
    "bool_block" (True = blocked) or "additive" (large negative = blocked)."""
    if how == "bool_keep":
        return mask.bool() if mask.dtype == torch.bool else mask > -1e3
    if how == "bool_block":
        return ~mask.bool()
    return mask > -1e3


def _is_causal_mask(allowed: torch.Tensor, q_len: int, kv_len: int) -> bool | None:
    """True when every key after a query's own position is blocked, None when no key can be."""
    allowed = allowed.expand(*allowed.shape[:-2], q_len, kv_len)  # (..., T, S)
    future = torch.ones(q_len, kv_len, dtype=torch.bool).triu(kv_len - q_len + 1)  # (T, S)
    if not future.any():
        return None
    return bool(not allowed[..., future].any())


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


_SCALE_OPS = ("mul", "truediv", "div", "to", "type", "float", "contiguous")


def _match_matmul_softmax(softmax: fx.Node) -> tuple | None:
    """For ``matmul(softmax(f(matmul(q, k^T))), v)`` return (q, k^T, v, the p @ v node, mask, how),
    where f scales and masks the scores and ``how`` says how the mask is applied (see _allowed).
    None when the softmax does not feed a matmul (not attention); AnalysisError when it does but
    the scores are not understood."""
    dim = _arg(softmax, 1, "dim", None)
    rank = len(_shape(softmax) or ())
    if dim is None or rank < 2 or dim % rank != rank - 1:
        return None
    # forwards to p @ v through casts and dropout
    node = softmax
    for _ in range(6):
        users = list(node.users)
        if len(users) != 1:
            return None
        node = users[0]
        if _name(node) in _MATMUL and node.args[0] is not None:
            break
        if _name(node) not in ("to", "type", "float", "dropout", "half", "bfloat16"):
            return None
    else:
        return None
    pv = node
    # backwards to q @ k^T through scaling and masking
    node, mask, how = softmax.args[0], None, None
    for _ in range(8):
        name = _name(node)
        if name in _MATMUL:
            return node.args[0], node.args[1], pv.args[1], pv, mask, how
        if name in _SCALE_OPS:
            node = node.args[0] if isinstance(node.args[0], fx.Node) else node.args[1]
        elif name == "add":
            a, b = node.args[0], node.args[1]
            scores_first = _name(a) in _MATMUL + _SCALE_OPS or _name(b) not in _MATMUL + _SCALE_OPS
            node, mask, how = (a, b, "additive") if scores_first else (b, a, "additive")
        elif name == "masked_fill":
            mask, how, node = node.args[1], "bool_block", node.args[0]
        elif name == "where":
            keep_scores = isinstance(node.args[1], fx.Node) and _shape(node.args[1]) == _shape(node)
            mask, how = node.args[0], ("bool_keep" if keep_scores else "bool_block")
            node = node.args[1] if keep_scores else node.args[2]
        else:
            break
        if not isinstance(node, fx.Node):
            break
    raise AnalysisError(f"softmax feeds matmul {pv.name}, but its scores do not come from matmul(q, k^T) "
                        "through scaling and masking")


def _attention_site(gm: fx.GraphModule, node: fx.Node, example_inputs: Sequence[Any], outputs: set[fx.Node],
                    ordinal: int) -> AttentionSite | None:
    """The site of an SDPA call or a softmax; None for a softmax that is not attention."""
    if _name(node) == "scaled_dot_product_attention":
        form = "sdpa"
        q, k, v = node.args[:3]
        mask = _arg(node, 3, "attn_mask")
        flag_causal = bool(_arg(node, 5, "is_causal", False))
        how = "bool_keep"
        out_node = node
    else:
        form = "matmul_softmax"
        matched = _match_matmul_softmax(node)
        if matched is None:
            return None
        q, k_t, v, out_node, mask, how = matched
        k = k_t
        flag_causal = False
    q_shape, k_shape = _shape(q), _shape(k)
    if q_shape is None or k_shape is None or len(q_shape) < 3:
        raise AnalysisError(f"q / k shapes unknown or not (B, H, T, D): {q_shape} / {k_shape}")
    head_dim = _static(q_shape[-1])
    q_len = _static(q_shape[-2])
    kv_len = _static(k_shape[-2] if form == "sdpa" else k_shape[-1])
    traces = {name: _trace_projection(t, outputs) for name, t in (("q", q), ("k", k), ("v", v))}
    if not isinstance(head_dim, int):
        raise AnalysisError(f"head dim is symbolic ({head_dim})")
    q_features, k_features = _portion_features(traces["q"]), _portion_features(traces["k"])
    if q_features % head_dim or k_features % head_dim:
        raise AnalysisError(f"projection widths {q_features} / {k_features} are not multiples of head dim {head_dim}")
    num_heads, num_kv_heads = q_features // head_dim, k_features // head_dim
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise AnalysisError(f"{num_heads} query heads cannot share {num_kv_heads} KV heads evenly")
    k_cache, v_cache = traces["k"].cache, traces["v"].cache
    if (k_cache is None) != (v_cache is None):
        raise AnalysisError("only one of K and V goes through a cache")
    o = _trace_output_projection(out_node)
    if o is None:
        raise AnalysisError("no output projection found downstream of the attention")

    causal: bool | None = True if flag_causal else None
    if causal is None and isinstance(mask, fx.Node) and isinstance(q_len, int) and isinstance(kv_len, int):
        value = _evaluate(gm, mask, example_inputs)
        if value is not None:
            causal = _is_causal_mask(_allowed(value, how), q_len, kv_len)
    if causal is None and mask is None and not flag_causal and isinstance(q_len, int) and q_len > 1:
        causal = False
    if causal is None and k_cache is not None:
        causal = True  # a query over a cache with no future keys to block: an autoregressive decoder
    if causal is None and q_len == 1:
        causal = False
    fused = len({id(t.linear.node) for t in traces.values()}) == 1
    scale = _arg(node, 6, "scale") if form == "sdpa" else None
    scale = float(scale) if isinstance(scale, (int, float)) else head_dim ** -0.5
    path = _module_path(node)
    layer = _layer_index(node, traces["q"].linear.weight)
    return AttentionSite(
        layer=ordinal if layer is None else layer, node=node, form=form, module_path=path,
        q=traces["q"].linear, k=traces["k"].linear, v=traces["v"].linear, o=o, qkv_fused=fused,
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, causal=causal,
        q_len=q_len, kv_len=kv_len, seq_axis=len(k_shape) - 2,
        mask=mask if isinstance(mask, fx.Node) else None, query=q, key=k, scale=scale, k_cache=k_cache, v_cache=v_cache,
    )


# ---------------------------------------------------------------------------------------------
# MLP
# ---------------------------------------------------------------------------------------------


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
        name = _name(node)
        if name not in _POINTWISE and name not in _ACTIVATIONS:
            return None
        if name in _ACTIVATIONS:
            acts.add(_ACTIVATIONS[name])
        elif name == "tanh":
            acts.add("tanh")
        if len(seen) > _MAX_SEARCH:
            return None
        stack.extend(_tensor_inputs(node))
    return list(ups.values()), acts


def _activation_name(acts: set[str]) -> str:
    if acts == {"tanh"}:
        return "gelu_tanh"  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), written out
    if not acts:
        return "none"
    return "+".join(sorted(acts))


def _same_input(a: LinearOp, b: LinearOp) -> bool:
    def root(n: fx.Node) -> fx.Node:
        while _name(n) in ("view", "reshape", "contiguous") and isinstance(n.args[0], fx.Node):
            n = n.args[0]
        return n
    return root(a.input) is root(b.input)


def _mlp_site(down: LinearOp, ordinal: int) -> MLPSite | SkippedRegion | None:
    walked = _mlp_inputs(down)
    if walked is None:
        return None
    ups, acts = walked
    if not ups or all(u.out_features != down.in_features for u in ups):
        return None
    path = _module_path(down.node)
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
    layer = _layer_index(down.node, down.weight)
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
            if _name(node) in _ACTIVATIONS or _name(node) == "tanh":
                return True
            if _name(node) in ("mul", "mul_"):
                continue  # the gate product: stop before the other branch
            stack.extend(node.users)
        return False
    first, second = ups
    if activated(first) and not activated(second):
        return first, second
    if activated(second) and not activated(first):
        return second, first
    return None, first


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def _attention_candidates(graph: fx.Graph) -> Iterable[fx.Node]:
    for node in graph.nodes:
        if _name(node) == "scaled_dot_product_attention" or _name(node) in _SOFTMAX:
            yield node


def analyze(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> GraphAnalysis:
    """Find one AttentionSite per attention block and one MLPSite per MLP in ``gm``.

    ``example_inputs`` are the real tensors the graph's placeholders stand for (Dynamo hands them
    to the backend); they are used only to evaluate attention masks.
    """
    result = GraphAnalysis(inputs=example_inputs)
    outputs = _graph_outputs(gm.graph)
    for node in _attention_candidates(gm.graph):
        try:
            site = _attention_site(gm, node, example_inputs, outputs, len(result.attention))
        except AnalysisError as err:
            result.skipped.append(SkippedRegion("attention", node.name, _module_path(node), str(err)))
            continue
        if site is not None:
            result.attention.append(site)
    attention_projections = {id(p.node) for s in result.attention for p in (s.q, s.k, s.v, s.o) if p is not None}
    for node in gm.graph.nodes:
        down = as_linear(node)
        if down is None or id(node) in attention_projections:
            continue
        site = _mlp_site(down, len(result.mlp))
        if isinstance(site, MLPSite):
            result.mlp.append(site)
        elif isinstance(site, SkippedRegion):
            result.skipped.append(site)
    log.info("analysis: %d attention sites, %d MLP sites, %d skipped regions",
             len(result.attention), len(result.mlp), len(result.skipped))
    return result


# ---------------------------------------------------------------------------------------------
# Token (sequence) axes
# ---------------------------------------------------------------------------------------------

_ELEMENTWISE = (_POINTWISE | set(_ACTIVATIONS) | {
    "cos", "sin", "log", "exp", "ge", "gt", "le", "lt", "eq", "ne", "and_", "or_", "logical_and", "logical_or",
    "logical_not", "bitwise_not", "invert", "where", "masked_fill", "softmax", "log_softmax", "expand", "expand_as",
    "type_as", "detach", "int", "long", "bool", "clamp_min", "clamp_max", "minimum", "maximum", "floordiv",
    "floor_divide", "remainder", "mod", "scaled_dot_product_attention",
})
_RESHAPES = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
_REDUCTIONS = {"sum", "mean", "amax", "amin", "var", "std", "logsumexp", "prod", "norm"}
_CREATION = {"arange", "ones", "zeros", "full", "empty", "new_ones", "new_zeros", "new_full", "new_empty", "tensor"}
_NO_TENSOR = {"_log_api_usage_once", "size", "dim", "numel"}
_LIKE = {"ones_like", "zeros_like", "full_like", "empty_like", "rand_like", "randn_like"}


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
        out_rank = len(_shape(node) or ())
        found = set()  # advanced indexing over every axis: the result is the indices' broadcast shape
        for i in index:
            sub = result.axes.get(i, ())
            if sub is None:
                return None
            found.update(a + out_rank - len(_shape(i) or ()) for a in sub)
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
        elif i.start in (None, 0) and shape[in_axis] != length and (_shape(node) or ())[out_axis] == length:
            out.append(out_axis)
        in_axis += 1
        out_axis += 1
    return tuple(out)


def _node_token_axes(node: fx.Node, result: TokenAxes) -> tuple[int, ...] | None:
    """The token axes of one node's value from its inputs' (see TokenAxes)."""
    length, name = result.length, _name(node)
    shape = _shape(node)
    inputs = [n for n in node.all_input_nodes if isinstance(example_value(n), (torch.Tensor, tuple, list))]
    known = {n: result.axes.get(n, ()) for n in inputs}
    if any(a is None for a in known.values()):
        return None
    if node.op == "placeholder":
        return () if is_parameter(node) or shape is None else tuple(i for i, s in enumerate(shape) if s == length)
    if node.op != "call_function" and node.op != "call_method" or name in _NO_TENSOR:
        return ()
    if name in _LIKE:
        return known.get(node.args[0], ())
    if name in _CREATION:
        return tuple(i for i, s in enumerate(shape or ()) if s == length and length > 1)
    source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    src_axes = known.get(source, ()) if source is not None else ()
    src_shape = _shape(source) if source is not None else None
    if name == "getitem" and isinstance(example_value(source), (tuple, list)):
        return src_axes
    if not any(known.values()):
        if name == "getitem" and src_shape is not None:
            return _getitem_axes(node, (), src_shape, length, result)
        if name == "cat" and shape is not None:  # tokens joined into a sequence: [CLS] + patches
            dim = _arg(node, 1, "dim", 0) % len(shape)
            return (dim,) if shape[dim] == length else ()
        return ()
    if shape is None and name not in ("split", "chunk", "split_with_sizes", "unbind"):
        return None
    if name == "getitem":
        return _getitem_axes(node, src_axes, src_shape, length, result)
    if name in _RESHAPES:
        mapped = [_reshape_axis(src_shape, shape, a) for a in src_axes]
        return None if None in mapped else tuple(mapped)
    if name in _ELEMENTWISE or name in ("layer_norm", "rms_norm", "group_norm"):
        if name in ("layer_norm", "rms_norm"):
            normalized = len(node.args[1]) if isinstance(node.args[1], (list, tuple)) else 1
            if any(a >= len(src_shape) - normalized for a in src_axes):
                return None
        out = set()
        for n, axes in known.items():
            n_shape = _shape(n) or ()
            for a in axes:
                b = a + len(shape) - len(n_shape)
                if shape[b] == n_shape[a]:
                    out.add(b)
        return tuple(sorted(out))
    if name in ("transpose", "swapaxes"):
        d0, d1 = (d % len(shape) for d in node.args[1:3])
        swap = {d0: d1, d1: d0}
        return tuple(sorted(swap.get(a, a) for a in src_axes))
    if name == "permute":
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
        order = [d % len(shape) for d in dims]
        return tuple(sorted(order.index(a) for a in src_axes))
    if name == "embedding":  # (..., T) ids -> (..., T, D)
        return src_axes
    if name == "linear":
        return None if len(src_shape) - 1 in src_axes else src_axes
    if name == "addmm":  # addmm(bias, x (N, in), W): tokens along x's rows go through, along its features do not
        rows = known.get(node.args[1], ())
        return None if known.get(node.args[0]) or 1 in rows else rows
    if name in _MATMUL:
        a, b = node.args[0], node.args[1]
        a_shape, b_shape = _shape(a) or (), _shape(b) or ()
        if len(a_shape) < 2 or len(b_shape) < 2:
            return None
        out = set()
        for ax in known.get(a, ()):
            if ax != len(a_shape) - 1:  # the contracted axis (p @ v sums over keys) leaves no token axis
                out.add(len(shape) - 2 if ax == len(a_shape) - 2 else ax + len(shape) - len(a_shape))
        for ax in known.get(b, ()):
            if ax != len(b_shape) - 2:
                out.add(len(shape) - 1 if ax == len(b_shape) - 1 else ax + len(shape) - len(b_shape))
        return tuple(sorted(out))
    if name == "cat":
        dim = _arg(node, 1, "dim", 0) % len(shape)
        out = set()
        for n, axes in known.items():
            if len(_shape(n) or ()) == len(shape):
                out.update(a for a in axes if a != dim or shape[dim] == length)
        return tuple(sorted(out))
    if name == "gather":
        dim = _arg(node, 1, "dim") % len(shape)
        if any(a != dim for a in src_axes):
            return None
        return known.get(_arg(node, 2, "index"), ())
    if name in _REDUCTIONS:
        dims = _arg(node, 1, "dim", None)
        dims = range(len(src_shape)) if dims is None else ([dims] if isinstance(dims, int) else list(dims))
        dims = {d % len(src_shape) for d in dims}
        keepdim = bool(_arg(node, 2, "keepdim", False))
        reduced = [a for a in src_axes if a in dims]
        if reduced:
            result.reductions[node] = reduced[0]
        return tuple(a if keepdim else a - sum(1 for d in dims if d < a) for a in src_axes if a not in dims)
    if name in ("split", "chunk", "split_with_sizes"):
        dim = _arg(node, 2, "dim", 0) % len(src_shape)
        return None if dim in src_axes else src_axes
    return None


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
