"""The table the generic tests run: example parameters for every registered method, small enough for
tiny models, and for KV methods a plain-torch reference of the scores, computed from the eager
model's attention. A new method is tested by adding its row; test_registry.py fails for a
registered method without one.
"""

import torch
import torch.nn.functional as F

from compile_sparse.passes.registry import METHODS, config_class

# family -> method -> parameters for a 40-token prompt on a 2-layer model
EXAMPLES = {
    "kv": {
        "streaming_llm": {}, "snapkv": {"window_size": 8}, "pyramidkv": {"window_size": 8},
        "h2o": {"recent_window": 4}, "tova": {}, "knorm": {}, "hitkv": {"top_k": 4, "recent_window": 4},
        "keydiff": {}, "defensivekv": {"window_size": 8}, "expected_attention": {},
        "dapq": {"window_size": 8}, "kvzip": {},
    },
    "tokens": {
        "lazyllm": {"layers": [1], "keep_ratios": [0.5], "window": 4},
        "evit": {"layers": [1], "keep_ratios": [0.5]},
        "tome": {"layers": [1], "keep_ratios": [0.75]},
    },
    "prune": {  # criteria that need data get calibration batches from the tests
        "magnitude": {}, "wanda": {}, "flap": {}, "taylor": {}, "d2prune": {}, "nm": {"criterion": "magnitude"},
        "plan": None,  # applies a saved plan: tested in test_prune.py from the plans the criteria write
    },
}


def names(family, **flags):
    """Registered methods of a family (each with a row in EXAMPLES), optionally filtered by class
    flags (``names("kv", SUPPORTS_DECODE=True)``)."""
    return [name for name in sorted(METHODS[family])
            if all(getattr(config_class(family, name), flag, None) == value for flag, value in flags.items())]


def kv_options(method, ratio, **params):
    return {"method": method, "compression_ratio": ratio, **EXAMPLES["kv"][method], **params}


def _per_kv_head(x, group):
    """(B, H, T) -> (B, Hkv, T): the mean over the query heads of each KV group."""
    b, h, t = x.shape
    return x.view(b, h // group, group, t).mean(2)


def _hits(probs, top_k):
    top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    return torch.zeros_like(probs).scatter_(-1, top.indices, (top.values > 0).float())


# method -> (eager attention probs (B, H, T, T), keys (B, Hkv, T, D), group) -> prefill scores (B, Hkv, T),
# with the protected window of the method's EXAMPLES parameters marked +inf
def _protect(scores, window):
    if window:
        scores[..., -window:] = float("inf")
    return scores


def _snapkv(probs, keys, group):
    window = _per_kv_head(probs[:, :, -8:].mean(2), group)
    return _protect(F.avg_pool1d(window, 5, stride=1, padding=2, count_include_pad=False), 8)


def _defensivekv(probs, keys, group):
    """The window's rows, each pooled (its mass kept); the max over rows and group heads, floored at
    the mean over keys; ties under the floor broken by a thousandth of the floor times the mean row."""
    b, h, _, t = probs.shape
    rows = probs[:, :, -8:].reshape(b * h * 8, 1, t)
    pooled = F.avg_pool1d(rows, 5, stride=1, padding=2, count_include_pad=False)
    pooled = (pooled * rows.sum(-1, keepdim=True) / pooled.sum(-1, keepdim=True)).view(b, h // group, group * 8, t)
    worst = pooled.amax(2)
    floor = worst.mean(-1, keepdim=True)
    mean = pooled.mean(2)
    return _protect(worst.clamp(min=floor) + floor * 1e-3 * mean / mean.amax(-1, keepdim=True), 8)


def _keydiff(probs, keys, group):
    units = keys / keys.norm(dim=-1, keepdim=True)
    anchor = units.mean(2, keepdim=True)
    return -(units * anchor).sum(-1) / anchor.norm(dim=-1)


PREFILL_REFERENCE = {
    "keydiff": _keydiff,
    "defensivekv": _defensivekv,
    "h2o": lambda probs, keys, group: _protect(
        _per_kv_head(probs.sum(2) / torch.arange(probs.shape[-1], 0, -1).float(), group), 4),
    "hitkv": lambda probs, keys, group: _protect(
        _per_kv_head(_hits(probs, 4).sum(2) / torch.arange(probs.shape[-1], 0, -1).float(), group), 4),
    "tova": lambda probs, keys, group: probs[:, :, -1].mean(1, keepdim=True).expand(-1, keys.shape[1], -1).clone(),
    "snapkv": _snapkv,
    "pyramidkv": _snapkv,
    "knorm": lambda probs, keys, group: -keys.norm(dim=-1),
    "streaming_llm": lambda probs, keys, group: torch.where(
        torch.arange(keys.shape[2]) < 4, float("inf"), torch.arange(keys.shape[2]).float()).expand(
        keys.shape[0], keys.shape[1], -1).clone(),
}


def _q_proj_outputs(model, input_ids):
    """The eager model's queries before RoPE, per layer (B, T, H * D), and its output (with the cache)."""
    captured = []
    hooks = [layer.self_attn.q_proj.register_forward_hook(lambda module, args, out: captured.append(out))
             for layer in model.model.layers]
    with torch.no_grad():
        out = model(input_ids=input_ids, use_cache=True)
    for hook in hooks:
        hook.remove()
    return captured, out


def _expected_attention(model, input_ids):
    """kvpress 0.5.5's ExpectedAttentionPress in plain torch over the eager model, per layer (B, Hkv, T):
    the queries before RoPE from q_proj's output, RoPE's tables at the next 512 positions from the
    model's rotary embedding, their mean rotation as a (D, D) matrix applied to the queries' mean
    and covariance (the first 4 tokens left out); the expected logits softmaxed over the other keys,
    averaged over each KV group, times the values' norms; the 4 sinks +inf."""
    config = model.config
    captured, out = _q_proj_outputs(model, input_ids)
    (b, t), heads, d = input_ids.shape, config.num_attention_heads, config.head_dim
    group = heads // config.num_key_value_heads
    cos, sin = model.model.rotary_emb(captured[0], torch.arange(t, t + 512)[None])  # (1, 512, D)
    swap = torch.zeros(d, d)
    swap[d // 2:, :d // 2], swap[:d // 2, d // 2:] = torch.eye(d // 2), -torch.eye(d // 2)
    rotation = (cos[0, :, None, :] * torch.eye(d) + sin[0, :, None, :] * swap).mean(0)  # (D, D)
    scores = []
    for queries, layer in zip(captured, out.past_key_values.layers):
        q = queries.view(b, t, heads, d).transpose(1, 2)[:, :, 4:]  # (B, H, T - 4, D)
        mean = q.mean(2)  # (B, H, D)
        centered = q - mean[:, :, None]
        covariance = rotation @ (centered.transpose(-1, -2) @ centered / centered.shape[2]) @ rotation.T
        keys = layer.keys[:, :, 4:].repeat_interleave(group, 1)  # (B, H, T - 4, D)
        logits = keys @ (mean @ rotation.T)[..., None] / d ** 0.5
        logits = logits[..., 0] + torch.einsum("bhtd,bhde,bhte->bht", keys, covariance, keys) / d / 2
        probs = torch.softmax(logits, -1).view(b, heads // group, group, t - 4).mean(2)
        expected = probs * layer.values[:, :, 4:].norm(dim=-1)  # (B, Hkv, T - 4)
        scores.append(torch.cat([torch.full((b, heads // group, 4), float("inf")), expected], dim=-1))
    return scores


def _dapq(model, input_ids):
    """DapQ as read in its file, per layer (B, Hkv, T): the last 8 queries before RoPE (q_proj's
    output) rotated by the model's rotary embedding to the 8 positions after the prompt; their softmax
    over every key, averaged over them and over each KV group, pooled over 5 positions."""
    queries, out = _q_proj_outputs(model, input_ids)
    config = model.config
    (b, t), heads, d = input_ids.shape, config.num_attention_heads, config.head_dim
    group = heads // config.num_key_value_heads
    cos, sin = model.model.rotary_emb(queries[0], torch.arange(t, t + 8)[None])  # (1, 8, D)
    scores = []
    for q, layer in zip(queries, out.past_key_values.layers):
        q = q.view(b, t, heads, d).transpose(1, 2)[:, :, -8:]  # (B, H, 8, D)
        pseudo = q * cos[:, None] + torch.cat([-q[..., d // 2:], q[..., :d // 2]], -1) * sin[:, None]
        probs = torch.softmax(pseudo @ layer.keys.repeat_interleave(group, 1).transpose(-1, -2) / d ** 0.5, -1)
        mean = _per_kv_head(probs.mean(2), group)  # (B, Hkv, T)
        scores.append(F.avg_pool1d(mean, 5, stride=1, padding=2, count_include_pad=False))
    return scores


# method -> (eager model, input ids (B, T)) -> prefill scores per layer (B, Hkv, T), for methods whose
# reference needs more of the model than its attention probabilities
MODEL_REFERENCE = {"expected_attention": _expected_attention, "dapq": _dapq}


# The decode rule, per method with one: the new token takes the slot of the lowest score of the
# previous call (its "priority"); then the new query's attention (B, H, P) over the slots, in slot
# order, gives the new scores. method -> (start, step, window):
#   start(prefill probs (B, H, T, T), group) -> the method's state of every prompt token, or None;
#   step(state (of the slots, the new token's reset to 0), probs, group) -> (scores (B, Hkv, P), state);
#   window: the newest tokens (by position) that are never evicted. StreamingLLM's step is None: its
#   scores are positions, the first 4 above all.
def _start(per_query):
    def start(probs, group):
        b, h, t, _ = probs.shape
        total = per_query(probs).sum(2).view(b, h // group, group, t).sum(2)  # (B, Hkv, T)
        count = torch.arange(t, 0, -1).float() * group
        return [total, count.expand_as(total).clone()]
    return start


def _step(per_query):
    def step(state, probs, group):
        total, count = state
        b, h, t = probs.shape
        total = total + per_query(probs[:, :, None])[:, :, 0].view(b, h // group, group, t).sum(2)
        count = count + group
        return total / count, [total, count]
    return step


DECODE = {
    "h2o": (_start(lambda p: p), _step(lambda p: p), 4),
    "hitkv": (_start(lambda p: _hits(p, 4)), _step(lambda p: _hits(p, 4)), 4),
    "tova": (lambda probs, group: None,
             lambda state, probs, group: (probs.mean(1)[:, None].expand(-1, probs.shape[1] // group, -1).clone(), None), 0),
    "streaming_llm": (lambda probs, group: None, None, 0),
}
