"""The records the analysis produces: projections, cache slots, attention and MLP sites, skipped
regions, and the GraphAnalysis that holds them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch.fx as fx

from .ops import arg_of, example_value, is_parameter, op_name, shape_of


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
        return self.node.args[1] if op_name(self.node) == "addmm" else self.node.args[0]

    def num_params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)


def as_linear(node: Any) -> LinearOp | None:
    """The node as a LinearOp if it is a projection by a parameter, else None."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return None
    name = op_name(node)
    if name == "linear":
        weight, bias = node.args[1], arg_of(node, 2, "bias")
        layout = "out_in"
    elif name == "addmm" and node.op == "call_function":
        bias, weight = node.args[0], node.args[2]
        layout = "in_out"
    elif name in ("matmul", "mm") and len(node.args) == 2 and is_parameter(node.args[1]):
        weight, bias = node.args[1], None
        layout = "in_out"
    else:
        return None
    shape = shape_of(weight)
    if not is_parameter(weight) or shape is None or len(shape) != 2:
        return None
    out_f, in_f = (shape if layout == "out_in" else shape[::-1])
    return LinearOp(node, weight, bias if isinstance(bias, fx.Node) else None, int(in_f), int(out_f), layout)


@dataclass
class CacheSlot:
    """Where one of K or V meets the KV cache.

    ``kind`` is "concat" (DynamicCache: ``torch.cat([past, new], dim=seq_axis)``), "sliding" (HF's
    DynamicSlidingWindowLayer: the same cat, of which the graph hands back only the last tokens) or
    "index_copy" (StaticCache: ``past.index_copy_(seq_axis, positions, new)``). ``input`` is the
    past tensor (a placeholder, or the node that creates an empty cache on the first call),
    ``update`` the op that appends, ``output`` the graph output that hands the updated cache back
    (for "concat", the cat; for "sliding", the slice of it; for "index_copy", the cache itself
    when the graph returns it, else None: updated in place).
    """

    kind: str
    input: fx.Node
    update: fx.Node
    output: fx.Node | None
    seq_axis: int

    @property
    def new(self) -> fx.Node:
        """This call's new tokens (keys or values) as the update receives them: (B, Hkv, n, D)."""
        return self.update.args[0][1] if self.kind in ("concat", "sliding") else self.update.args[3]

    @property
    def prefill(self) -> bool:
        """The cache starts empty in this graph (created here, not passed in)."""
        return self.input.op != "placeholder"


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
    mask_how: str | None  # how the mask applies: "bool_keep" (True attends), "bool_block" or "additive"
    output: fx.Node  # the node whose value is the attention output (B, num_heads, q_len, head_dim)
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

