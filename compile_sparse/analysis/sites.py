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
    ``addmm(b, x2d, W)`` and ``matmul(x, W)`` (W is (in, out)). ``rows`` and ``part``: this op
    is one part of a fused projection's output (Phi-3's gate and up in ``gate_up_proj``): the
    output features [start, stop) of W it stands for, and the ``getitem`` node that selects them
    (``out_features`` is then stop - start)."""

    node: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    in_features: int
    out_features: int
    weight_layout: str  # "out_in" or "in_out"
    rows: tuple[int, int] | None = None
    part: fx.Node | None = None

    @property
    def input(self) -> fx.Node:
        return self.node.args[1] if op_name(self.node) == "addmm" else self.node.args[0]

    @property
    def output(self) -> fx.Node:
        """The node holding this op's output features: the part's getitem, else the op itself."""
        return self.part if self.part is not None else self.node

    def num_params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)


def _transposed_parameter(node: Any) -> fx.Node | None:
    """``W.T`` (or ``W.t()``) of a parameter W: W, else None."""
    if not isinstance(node, fx.Node):
        return None
    if op_name(node) == "getattr" and node.args[1:] == ("T",) or op_name(node) in ("t", "transpose") and \
            (op_name(node) == "t" or len(node.args) == 3 and {a % 2 for a in node.args[1:]} == {0, 1}):
        source = node.args[0]
        return source if is_parameter(source) else None
    return None


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
    elif name in ("matmul", "mm") and len(node.args) == 2 and _transposed_parameter(node.args[1]) is not None:
        weight, bias = _transposed_parameter(node.args[1]), None  # Falcon's ``x @ self.weight.T``
        layout = "out_in"
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
    stack: str  # "encoder" / "decoder" in an encoder-decoder model, else ""
    cross: bool  # cross-attention: K and V come from another sequence than Q (an encoder's output)
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
    scale: float  # the softmax scale: SDPA's scale argument, the graph's factor, else 1 / sqrt(head_dim)
    softcap: float | None  # logits = softcap * tanh(logits / softcap) before the softmax (Gemma 2), or None
    k_cache: CacheSlot | None = None
    v_cache: CacheSlot | None = None
    # RoPE's tables at the query, ``q * cos + rotate_half(q) * sin``: (cos, sin), each broadcasting to
    # the query (B, 1, q_len, head_dim) in HF's layout; None when the query was not seen rotated so
    rope: tuple[fx.Node, fx.Node] | None = None

    @property
    def has_cache(self) -> bool:
        return self.k_cache is not None

    @property
    def name(self) -> str:
        """How reports name the site: "layer 3 attention", "decoder layer 0 cross-attention"."""
        stack = f"{self.stack} " if self.stack else ""
        return f"{stack}layer {self.layer} {'cross-attention' if self.cross else 'attention'}"

    def kv_bytes_per_token(self) -> int:
        """Bytes one token adds to this layer's cache (K and V), 0 without a cache."""
        if not self.has_cache:
            return 0
        cached = example_value(self.k_cache.update)  # (B, heads as cached, T, D)
        return 2 * cached.shape[1] * cached.shape[-1] * cached.element_size()

    def num_params(self) -> int:
        projections = {id(p.node): p for p in (self.q, self.k, self.v, self.o) if p is not None}
        return sum(p.num_params() for p in projections.values())

    def summary(self) -> dict:
        return {
            "layer": self.layer, "name": self.name, "form": self.form, "module": self.module_path, "cross": self.cross,
            "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
            "causal": self.causal, "q_len": self.q_len, "kv_len": self.kv_len, "seq_axis": self.seq_axis,
            "qkv_fused": self.qkv_fused, "rope": self.rope is not None,
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
    stack: str  # "encoder" / "decoder" in an encoder-decoder model, else ""
    gated: bool
    activation: str
    hidden_size: int
    intermediate_size: int
    up: LinearOp
    gate: LinearOp | None
    down: LinearOp

    @property
    def name(self) -> str:
        """How reports name the site: "layer 3 mlp", "encoder layer 1 mlp"."""
        return f"{self.stack + ' ' if self.stack else ''}layer {self.layer} mlp"

    def num_params(self) -> int:
        return sum(p.num_params() for p in (self.up, self.gate, self.down) if p is not None)

    @property
    def fused(self) -> bool:
        """Gate and up are parts of one fused projection."""
        return self.gate is not None and self.gate.weight is self.up.weight

    def summary(self) -> dict:
        return {
            "layer": self.layer, "name": self.name, "module": self.module_path, "gated": self.gated, "fused": self.fused,
            "activation": self.activation,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "weights": {k: (p.weight.name if p is not None else None)
                        for k, p in (("gate", self.gate), ("up", self.up), ("down", self.down))},
            "params": self.num_params(),
        }


@dataclass
class SkippedRegion:
    """A region that looks like attention or an MLP but was not fully understood: never rewritten."""

    kind: str  # "attention", "mlp" or "experts"
    node: str
    module_path: str
    reason: str
    expected: bool = False  # left alone by design (an encoder's cached keys read as they are): no warning
    layer: int | None = None

    @property
    def name(self) -> str:
        """How reports name the region: "layer 3 experts", or the node."""
        return f"layer {self.layer} {self.kind}" if self.layer is not None else f"{self.kind} at {self.node}"

    def summary(self) -> dict:
        return {"kind": self.kind, "node": self.node, "module": self.module_path, "reason": self.reason,
                "expected": self.expected, "layer": self.layer}


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
    """Raised inside the analysis when a candidate region cannot be fully understood. ``expected``:
    a region left alone by design (said in explain, not warned about)."""

    def __init__(self, reason: str, expected: bool = False):
        super().__init__(reason)
        self.expected = expected

