"""Attention regions: an SDPA call or a matmul-softmax-matmul chain, its q / k / v / o projections,
heads, causality (read off the mask the graph builds) and the KV cache it reads."""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx

from ..reference import mask_allows
from .ops import (BOUNDARY, MATMUL, MAX_SEARCH, arg_of, example_value, is_parameter, layer_index, module_path, op_name,
                  shape_of, stack_of, static_size, tensor_inputs)
from .sites import AnalysisError, AttentionSite, CacheSlot, LinearOp, as_linear

log = logging.getLogger("compile_sparse")


def _is_empty_cache(node: fx.Node) -> bool:
    """A cache that does not exist yet: HF's ``torch.tensor([])`` / ``torch.zeros(...)`` stand-in."""
    return node.op == "call_function" and op_name(node) in ("tensor", "zeros", "empty")


def _is_cache_tensor(node: fx.Node) -> bool:
    return (node.op == "placeholder" and not is_parameter(node)) or _is_empty_cache(node)


def _window_slice(cat: fx.Node, dim: int, outputs: set[fx.Node]) -> fx.Node | None:
    """The graph output that keeps the last tokens of ``cat`` along ``dim`` (``cat[:, :, -w:]``), if any."""
    for user in cat.users:
        if op_name(user) != "getitem" or user not in outputs or not isinstance(user.args[1], tuple):
            continue
        index = user.args[1]
        if len(index) > dim and isinstance(index[dim], slice) and isinstance(index[dim].start, int) \
                and index[dim].start < 0 and index[dim].stop is None:
            return user
    return None


def _index_copy_into(node: fx.Node) -> fx.Node | None:
    for user in node.users:
        if op_name(user) == "index_copy_" and user.args[0] is node:
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
    while queue and len(parent) < MAX_SEARCH:
        node = queue.popleft()
        linear = as_linear(node)
        if linear is not None:
            path = [node]
            while parent[path[-1]] is not None:
                path.append(parent[path[-1]])
            return _Trace(linear, path[::-1], cache)
        if node is not start and op_name(node) in BOUNDARY:
            continue
        nexts = tensor_inputs(node)
        if op_name(node) == "cat" and cache is None:
            parts = node.args[0]
            past = [p for p in parts if isinstance(p, fx.Node) and _is_cache_tensor(p)]
            if past:
                rank = len(shape_of(node) or ()) or 4
                dim = arg_of(node, 1, "dim", 0) % rank
                kind, out = "concat", node if node in outputs else None
                window = _window_slice(node, dim, outputs)
                if out is None and window is not None:  # HF's DynamicSlidingWindowLayer keeps the last tokens
                    kind, out = "sliding", window
                cache = CacheSlot(kind, past[0], node, out, dim)
                nexts = [p for p in parts if isinstance(p, fx.Node) and p is not past[0]]
        if _is_cache_tensor(node) and cache is None:
            write = _index_copy_into(node)
            if write is not None:
                rank = len(shape_of(node) or ()) or 4
                cache = CacheSlot("index_copy", node, write, node if node in outputs else None, write.args[1] % rank)
                nexts = [write.args[3]]
        for n in nexts:
            if n not in parent:
                parent[n] = node
                queue.append(n)
    raise AnalysisError(f"no projection by a parameter found within {MAX_SEARCH} nodes upstream of {start.name}")


def _portion_features(trace: _Trace, head_dim: int) -> int:
    """How many of the projection's output features feed this tensor: all of them, or the part a
    split / slice of a fused qkv projection takes. A slice narrower than a head (the rotary part of
    a head, with partial rotary embeddings) is not a split of the projection."""
    full = example_value(trace.linear.node)
    for node in reversed(trace.path[:-1]):  # from the projection forwards
        value = example_value(node)
        if op_name(node) == "cat" or (trace.cache is not None and node is trace.cache.input):
            break  # the cache: what comes after it is not a part of the projection
        if isinstance(value, torch.Tensor) and value.numel() < full.numel() and value.shape[-1] >= head_dim:
            return trace.linear.out_features * value.numel() // full.numel()
    return trace.linear.out_features


def _trace_output_projection(start: fx.Node) -> LinearOp | None:
    """The projection the attention output feeds, through reshapes / transposes / dropout."""
    queue, seen = deque([start]), {start}
    while queue and len(seen) < MAX_SEARCH:
        node = queue.popleft()
        linear = as_linear(node)
        if linear is not None and node is not start:
            return linear
        if node is not start and op_name(node) in BOUNDARY:
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
        if as_linear(node) is not None or op_name(node) in ("scaled_dot_product_attention", "softmax") or len(seen) > 400:
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


def _is_causal_mask(allowed: torch.Tensor, q_len: int, kv_len: int) -> bool | None:
    """True when every key after a query's own position is blocked, None when no key can be."""
    allowed = allowed.expand(*allowed.shape[:-2], q_len, kv_len)  # (..., T, S)
    future = torch.ones(q_len, kv_len, dtype=torch.bool).triu(kv_len - q_len + 1)  # (T, S)
    if not future.any():
        return None
    return bool(not allowed[..., future].any())



_CASTS = ("to", "type", "float", "contiguous")
_SCORE_OPS = MATMUL + _CASTS + ("mul", "truediv", "div", "tanh")  # what the scores pass before a mask is added


@dataclass
class _Scores:
    """A matched matmul-softmax-matmul attention: q, k^T and v at the matmuls, the p @ v node, the
    mask and how it applies, the scale multiplying q @ k^T (None when the graph shows none) and the
    softcap c of ``c * tanh(x / c)`` (Gemma 2), if any."""

    q: fx.Node
    k_t: fx.Node
    v: fx.Node
    pv: fx.Node
    mask: fx.Node | None
    how: str | None
    scale: float | None
    softcap: float | None


def _constant(value: Any) -> float | None:
    """A number a graph multiplies or divides by: a Python number, or ``torch.full([], c)``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, fx.Node) and op_name(value) == "full" and isinstance(value.args[1], (int, float)):
        return float(value.args[1])
    return None


def _factor(node: fx.Node) -> tuple[fx.Node, float] | None:
    """For ``x * c``, ``c * x`` or ``x / c`` with a constant c: (x, the factor)."""
    name = op_name(node)
    if name not in ("mul", "truediv", "div") or len(node.args) < 2:
        return None
    a, b = node.args[:2]
    if name == "mul":
        if _constant(b) is not None and isinstance(a, fx.Node):
            return a, _constant(b)
        if _constant(a) is not None and isinstance(b, fx.Node):
            return b, _constant(a)
    if name in ("truediv", "div") and isinstance(a, fx.Node) and _constant(b) not in (None, 0.0):
        return a, 1.0 / _constant(b)
    return None


def _match_matmul_softmax(softmax: fx.Node) -> _Scores | None:
    """For ``matmul(softmax(f(matmul(q, k^T))), v)`` the matched pieces, where f scales, softcaps
    and masks the scores. None when the softmax does not feed a matmul (not attention);
    AnalysisError when it does but the scores are not understood."""
    dim = arg_of(softmax, 1, "dim", None)
    rank = len(shape_of(softmax) or ())
    if dim is None or rank < 2 or dim % rank != rank - 1:
        return None
    # forwards to p @ v through casts and dropout
    node = softmax
    for _ in range(6):
        users = list(node.users)
        if len(users) != 1:
            return None
        node = users[0]
        if op_name(node) in MATMUL and node.args[0] is not None:
            break
        if op_name(node) not in ("to", "type", "float", "dropout", "half", "bfloat16"):
            return None
    else:
        return None
    pv = node
    # backwards to q @ k^T through scaling, softcapping and masking
    node, mask, how = softmax.args[0], None, None
    factors: list[float] = []  # from the softmax back
    softcap = None
    for _ in range(12):
        name = op_name(node)
        if name in MATMUL:
            scale = math.prod(factors) if factors else None
            return _Scores(node.args[0], node.args[1], pv.args[1], pv, mask, how, scale, softcap)
        factor = _factor(node)
        if name == "tanh" and softcap is None and factors and _factor(node.args[0]) is not None:
            outer = factors.pop()  # c * tanh(x / c): the factor just after tanh, and the one just before
            inner, inverse = _factor(node.args[0])
            if abs(outer * inverse - 1) > 1e-6:
                break
            softcap, node = outer, inner
            continue
        if factor is not None:
            node, value = factor
            factors.append(value)
        elif name in _CASTS:
            node = node.args[0]
        elif name == "add":
            a, b = node.args[0], node.args[1]
            scores_first = op_name(a) in _SCORE_OPS or op_name(b) not in _SCORE_OPS
            node, mask, how = (a, b, "additive") if scores_first else (b, a, "additive")
        elif name == "masked_fill":
            mask, how, node = node.args[1], "bool_block", node.args[0]
        elif name == "where":
            keep_scores = isinstance(node.args[1], fx.Node) and shape_of(node.args[1]) == shape_of(node)
            mask, how = node.args[0], ("bool_keep" if keep_scores else "bool_block")
            node = node.args[1] if keep_scores else node.args[2]
        else:
            break
        if not isinstance(node, fx.Node):
            break
    raise AnalysisError(f"softmax feeds matmul {pv.name}, but its scores do not come from matmul(q, k^T) "
                        "through scaling, softcapping and masking")


def _reads_cache_as_is(node: fx.Node) -> bool:
    """The tensor is an input of the graph, reshaped at most: no projection, and not updated in
    place (a StaticCache buffer is written by ``index_copy_`` before attention reads it)."""
    for _ in range(8):
        if node.op == "placeholder":
            return not is_parameter(node) and not any(op_name(user).endswith("_") for user in node.users)
        if op_name(node) not in ("view", "reshape", "expand", "getitem", "transpose", "to", "contiguous", "float"):
            return False
        node = node.args[0]
        if not isinstance(node, fx.Node):
            return False
    return False


def _root(node: fx.Node) -> fx.Node:
    """A tensor before views, reshapes, casts and contiguous copies."""
    while op_name(node) in ("view", "reshape", "contiguous", "to", "float", "type") and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def attention_site(gm: fx.GraphModule, node: fx.Node, example_inputs: Sequence[Any], outputs: set[fx.Node],
                    ordinal: int) -> AttentionSite | None:
    """The site of an SDPA call or a softmax; None for a softmax that is not attention."""
    if op_name(node) == "scaled_dot_product_attention":
        form = "sdpa"
        q, k, v = node.args[:3]
        mask = arg_of(node, 3, "attn_mask")
        flag_causal = bool(arg_of(node, 5, "is_causal", False))
        how = "bool_keep"
        out_node = node
        softcap = None
    else:
        form = "matmul_softmax"
        matched = _match_matmul_softmax(node)
        if matched is None:
            return None
        q, k, v, out_node, mask, how, softcap = (matched.q, matched.k_t, matched.v, matched.pv, matched.mask,
                                                 matched.how, matched.softcap)
        flag_causal = False
    q_shape, k_shape = shape_of(q), shape_of(k)
    if q_shape is None or k_shape is None or len(q_shape) < 3:
        raise AnalysisError(f"q / k shapes unknown or not (B, H, T, D): {q_shape} / {k_shape}")
    head_dim = static_size(q_shape[-1])
    q_len = static_size(q_shape[-2])
    kv_len = static_size(k_shape[-2] if form == "sdpa" else k_shape[-1])
    if _reads_cache_as_is(k) and _reads_cache_as_is(v) and not _reads_cache_as_is(q):
        raise AnalysisError("cross-attention over cached keys and values read as they are (an encoder-decoder's "
                            "decode step): left alone", expected=True)
    traces = {name: _trace_projection(t, outputs) for name, t in (("q", q), ("k", k), ("v", v))}
    if not isinstance(head_dim, int):
        raise AnalysisError(f"head dim is symbolic ({head_dim})")
    q_features, k_features = _portion_features(traces["q"], head_dim), _portion_features(traces["k"], head_dim)
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
            causal = _is_causal_mask(mask_allows(value, how), q_len, kv_len)
    if causal is None and mask is None and not flag_causal and isinstance(q_len, int) and q_len > 1:
        causal = False
    if causal is None and k_cache is not None:
        causal = True  # a query over a cache with no future keys to block: an autoregressive decoder
    if causal is None and q_len == 1:
        causal = False
    fused = len({id(t.linear.node) for t in traces.values()}) == 1
    scale = arg_of(node, 6, "scale") if form == "sdpa" else matched.scale
    scale = float(scale) if isinstance(scale, (int, float)) else head_dim ** -0.5
    path = module_path(node)
    layer = layer_index(node, traces["q"].linear.weight)
    cross = not fused and _root(traces["q"].linear.input) is not _root(traces["k"].linear.input)
    return AttentionSite(
        layer=ordinal if layer is None else layer, node=node, form=form, module_path=path, stack=stack_of(node),
        cross=cross, softcap=softcap,
        q=traces["q"].linear, k=traces["k"].linear, v=traces["v"].linear, o=o, qkv_fused=fused,
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, causal=causal,
        q_len=q_len, kv_len=kv_len, seq_axis=len(k_shape) - 2,
        mask=mask if isinstance(mask, fx.Node) else None, mask_how=how if isinstance(mask, fx.Node) else None,
        output=out_node, query=q, key=k, scale=scale, k_cache=k_cache, v_cache=v_cache, rope=rope_tables(q),
    )


def _rotated_half(node: Any) -> fx.Node | None:
    """X when ``node`` is ``rotate_half(X)``: ``cat((-X[..., h:], X[..., :h]), dim=-1)`` with 2h the
    last size of X."""
    if not isinstance(node, fx.Node) or op_name(node) != "cat" or not isinstance(node.args[0], (list, tuple)) \
            or len(node.args[0]) != 2:
        return None
    negated, low = node.args[0]
    if not (isinstance(negated, fx.Node) and op_name(negated) == "neg" and isinstance(low, fx.Node)
            and op_name(low) == "getitem" and isinstance(negated.args[0], fx.Node)):
        return None
    high, source = negated.args[0], low.args[0]
    shape = shape_of(source) if isinstance(source, fx.Node) else None
    if op_name(high) != "getitem" or high.args[0] is not source or not shape or not isinstance(shape[-1], int):
        return None
    half = shape[-1] // 2
    dim = arg_of(node, 1, "dim")
    if dim not in (-1, len(shape) - 1) or high.args[1] != (Ellipsis, slice(half, None, None)) \
            or low.args[1] != (Ellipsis, slice(None, half, None)):
        return None
    return source


def rope_tables(q: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(cos, sin) when the query at the attention is ``q * cos + rotate_half(q) * sin`` (HF's
    ``apply_rotary_pos_emb``, in either operand order), else None."""
    if op_name(q) != "add" or len(q.args) != 2 or not all(isinstance(a, fx.Node) and op_name(a) == "mul"
                                                            for a in q.args):
        return None
    for plain, rotated in (q.args, q.args[::-1]):
        for half, sin in (rotated.args, rotated.args[::-1]):
            source = _rotated_half(half)
            if source is None or source not in plain.args or not isinstance(sin, fx.Node):
                continue
            cos = plain.args[1] if plain.args[0] is source else plain.args[0]
            if isinstance(cos, fx.Node):
                return cos, sin
    return None

