"""Per-head budgets (``head_budgets="adaptive"``, AdaKV) in a packed cache: the allocation against a
plain reference from the eager model's attention, exact bytes, identity (ratio 0, and a floor of 1
is the uniform cache), attention over the packed rows against a masked dense model, decode that
keeps every head's count, and generate() with dynamic and static caches and a padded batch."""

import pytest
import torch

import compile_sparse
from compile_sparse import models, retrieval
from compile_sparse.backend import sparse_backend
from compile_sparse.passes.kv.packed import OWNER, packed_attention
from compile_sparse.passes.kv.scoring import POSITION
from compile_sparse.passes.registry import build
from compile_sparse.state import STATE

from .helpers import compiled_generate_matches
from .methods import MODEL_REFERENCE, PREFILL_REFERENCE, kv_options, names

METHODS = names("kv", REREAD=False)  # a re-read method (kvzip) compresses in compress_context: tests/test_kvzip.py
DECODE_METHODS = names("kv", SUPPORTS_DECODE=True)
T, HEADS, KV_HEADS = 40, 6, 2


def kv(method, ratio, **params):
    """A method's example options with per-head budgets (TOVA scores per KV head then: ``per_head``)."""
    extra = {"per_head": True} if method == "tova" else {}
    return kv_options(method, ratio, **{"head_budgets": "adaptive", **extra, **params})


def ids(batch=2, length=T, seed=0):
    return torch.randint(1, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def gqa_model(**kwargs):
    return models.tiny_llama(heads=HEADS, kv_heads=KV_HEADS, **kwargs)


def run(model, options, prompt, steps=0, mask=None):
    """Prefill ``prompt`` (left-padded where ``mask`` is 0) through the compiled forward, then
    ``steps`` greedy decode steps: (cache, logits of every call's last token (calls, B, V))."""
    compiled = torch.compile(model.forward, backend="sparse", options={"kv": options, "lowering": "eager",
                                                                       "strict": True})
    positions = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers a padded row
    with torch.no_grad():
        out = compiled(input_ids=prompt, attention_mask=mask, position_ids=positions, use_cache=True)
        cache, logits = out.past_key_values, [out.logits[:, -1]]
        for step in range(steps):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            out = compiled(input_ids=token, past_key_values=cache, position_ids=torch.full((prompt.shape[0], 1), T + step))
            logits.append(out.logits[:, -1])
    return cache, torch.stack(logits)


def slots(layer):
    """The state of a packed layer's slots, one row per sequence: (B, Hkv * K, C)."""
    return STATE.store.get(layer.keys).flatten(1, 2)


def head_counts(layer):
    """Real slots each head owns (B, Hkv)."""
    state = slots(layer)
    real = state[..., POSITION] >= 0
    return torch.stack([(real & (state[..., OWNER] == h)).sum(-1) for h in range(layer.keys.shape[1])], dim=-1)


def kept_masks(cache, length=T):
    """Which prompt tokens each head keeps, per layer (B, Hkv, length) bool, read off the owners."""
    masks = []
    for layer in cache.layers:
        state = slots(layer)
        b, hkv = layer.keys.shape[:2]
        mask = torch.zeros(b, hkv, length, dtype=torch.bool)
        for row in range(b):
            for owner, position in state[row, :, [OWNER, POSITION]].long().tolist():
                if 0 <= position < length:
                    mask[row, owner, position] = True
        masks.append(mask)
    return masks


# ---------------------------------------------------------------------------------------------
# Identity
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["h2o", "snapkv", "tova"])
def test_ratio_zero_generates_exactly_dense(method):
    compiled_generate_matches(gqa_model(), ids(), {"kv": kv(method, 0.0), "lowering": "eager"}, steps=4)


@pytest.mark.parametrize("method", METHODS)
def test_a_floor_of_one_is_the_uniform_cache(method):
    """Every head keeping its own budget (floor 1): the packed cache is the uniform one, slot for
    slot, through the prompt and 4 decode steps (eviction, or growth without a decode rule)."""
    model = gqa_model()
    uniform, uniform_logits = run(model, kv(method, 0.75, head_budgets="uniform"), ids(), steps=4)
    packed, packed_logits = run(model, kv(method, 0.75, head_floor=1.0), ids(), steps=4)
    for a, b in zip(uniform.layers, packed.layers):
        assert torch.equal(STATE.store.get(a.keys)[..., POSITION], STATE.store.get(b.keys)[..., POSITION])
        torch.testing.assert_close(a.keys, b.keys)
        torch.testing.assert_close(a.values, b.values)
    torch.testing.assert_close(packed_logits, uniform_logits)


# ---------------------------------------------------------------------------------------------
# What is kept, and where
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [m for m in METHODS if m != "tova"])
def test_kept_tokens_match_the_allocation_of_a_reference(method):
    """The reference scores from the eager model's full attention, shared among a layer's heads by a
    plain AdaKV (``retrieval.allocate``, share "heads", floor 0.2), give the kept tokens; the packed
    row holds their keys head by head, in position order, then empty slots."""
    reference_model = gqa_model(attn_implementation="eager")
    model = gqa_model()
    prompt = ids()
    with torch.no_grad():
        dense = reference_model(input_ids=prompt, use_cache=True, output_attentions=True)
    cache, _ = run(model, kv(method, 0.5), prompt)
    from_model = MODEL_REFERENCE[method](reference_model, prompt) if method in MODEL_REFERENCE else None
    config = build("kv", method, {k: v for k, v in kv(method, 0.5).items() if k != "method"})
    for layer, (probs, dense_layer, packed) in enumerate(zip(dense.attentions, dense.past_key_values.layers,
                                                             cache.layers)):
        scores = from_model[layer] if from_model else PREFILL_REFERENCE[method](probs, dense_layer.keys, HEADS // KV_HEADS)
        budget = config.budget(layer, 2, T)
        kept = retrieval.allocate([scores], budget, "heads", 0.2)[0]  # (B, Hkv, T)
        ours = kept_masks(cache)[layer]
        for row in range(2):  # the same scores kept (HitKV's hit counts tie across heads: which of a tie is free)
            assert torch.equal(scores[row][ours[row]].sort().values, scores[row][kept[row]].sort().values)
        if method != "hitkv":
            assert torch.equal(ours, kept)
        for row in range(2):
            expected = torch.cat([dense_layer.keys[row, h, ours[row, h]] for h in range(KV_HEADS)])  # (Hkv * budget, D)
            real = slots(packed)[row, :, POSITION] >= 0  # (the widest layer's tensors: empty slots after each row)
            torch.testing.assert_close(packed.keys[row].flatten(0, 1)[real], expected)


def test_heads_share_the_bytes_of_the_uniform_cache():
    """Exact bytes: each layer's tensors hold Hkv x budget slots per row, all of them real, shared
    unequally among the heads (each with at least the floor); explain counts those bytes."""
    model = gqa_model()
    report = compile_sparse.explain(model, input_ids=ids(), use_cache=True, options={"kv": kv("snapkv", 0.75)})
    cache, _ = run(model, kv("snapkv", 0.75), ids())
    budget = T // 4
    counts = torch.stack([head_counts(layer) for layer in cache.layers])  # (L, B, Hkv)
    assert (counts.sum(-1) == KV_HEADS * budget).all()
    assert (counts >= int(0.2 * budget)).all() and (counts != budget).any()  # shared, not uniform
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert held == 2 * 2 * 2 * KV_HEADS * budget * 16 * 4  # layers x (K, V) x B x slots x D x fp32
    (result,) = report.passes
    assert result["kv_cache_bytes"]["after"] == held
    assert result["sites"]["layer 1 attention"] == ("prefill eviction: cache 40 -> 10 tokens per KV head on average, "
                                                    "shared by score (packed)")


def test_a_padded_row_keeps_what_it_keeps_alone():
    """In a left-padded batch each row shares its own budget: the short row keeps, head by head,
    the tokens it keeps as a batch of one (its pads are neither scored nor kept)."""
    model = gqa_model()
    batch = ids()
    mask = torch.ones_like(batch)
    mask[1, :10], batch[1, :10] = 0, 0
    cache, _ = run(model, kv("snapkv", 0.75), batch, mask=mask)
    torch.compiler.reset()
    alone, _ = run(model, kv("snapkv", 0.75), batch[1:, 10:])
    for layer, single in zip(cache.layers, alone.layers):
        assert torch.equal(head_counts(layer)[1], head_counts(single)[0])
        real = slots(layer)[1, :, POSITION] >= 0
        assert torch.equal(slots(layer)[1, real][:, [POSITION, OWNER]], slots(single)[0, :, [POSITION, OWNER]][:real.sum()])
        torch.testing.assert_close(layer.keys[1].flatten(0, 1)[real], single.keys[0].flatten(0, 1)[:real.sum()])


# ---------------------------------------------------------------------------------------------
# Attention over the packed rows
# ---------------------------------------------------------------------------------------------


def test_packed_attention_equals_attention_over_each_heads_own_tokens():
    """Random packed rows: each head attends to its own real slots at or before the query's
    position, as SDPA over that head's tokens alone does."""
    torch.manual_seed(0)
    b, hkv, group, length, d, n = 2, 3, 2, 9, 8, 2
    query = torch.randn(b, hkv * group, n, d)
    keys, values = torch.randn(b, hkv, length, d), torch.randn(b, hkv, length, d)
    owner = torch.randint(0, hkv, (b, hkv * length)).float()
    position = torch.randperm(hkv * length).float().expand(b, -1).clone()
    position[:, :3] = -1.0  # empty slots
    query_positions = torch.tensor([[20.0, 25.0], [26.0, 30.0]])
    out, _ = packed_attention(query, keys, values, position, owner, query_positions, 0.3, None)
    flat_k, flat_v = keys.flatten(1, 2), values.flatten(1, 2)
    for row in range(b):
        for head in range(hkv * group):
            for i in range(n):
                seen = (owner[row] == head // group) & (position[row] >= 0) & (position[row] <= query_positions[row, i])
                expected = torch.softmax(flat_k[row, seen] @ query[row, head, i] * 0.3, dim=0) @ flat_v[row, seen]
                torch.testing.assert_close(out[row, head, i], expected)


@pytest.mark.parametrize("method", ["snapkv", "defensivekv"])
def test_tokens_after_the_prompt_see_each_heads_kept_tokens(method):
    """Three tokens in one forward, then two decode steps, over the packed cache of a prompt-only
    method: the logits of the dense model with each head's evicted prompt tokens masked out."""
    model = gqa_model()
    prompt, more = ids(), ids(length=3, seed=1)
    compiled = torch.compile(model.forward, backend="sparse", options={"kv": kv(method, 0.75), "lowering": "eager"})
    with torch.no_grad():
        cache = compiled(input_ids=prompt, use_cache=True).past_key_values
        kept = kept_masks(cache)
        got = [compiled(input_ids=more, past_key_values=cache, position_ids=torch.arange(T, T + 3).expand(2, 3)).logits]
        dense = model(input_ids=prompt, use_cache=True).past_key_values
        with retrieval.masked(model, kept):
            expected = [model(input_ids=more, past_key_values=dense, position_ids=torch.arange(T, T + 3).expand(2, 3)).logits]
        for step in range(2):
            token = expected[-1][:, -1:].argmax(-1)
            position = torch.full((2, 1), T + 3 + step)
            got.append(compiled(input_ids=token, past_key_values=cache, position_ids=position).logits)
            with retrieval.masked(model, kept):
                expected.append(model(input_ids=token, past_key_values=dense, position_ids=position).logits)
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(expected, 1))
    assert [layer.keys.shape[2] for layer in cache.layers] == [T // 4 + 5] * 2  # every row grew by 5


# ---------------------------------------------------------------------------------------------
# Decode and generate()
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", DECODE_METHODS)
def test_decode_keeps_every_heads_count_and_compiles_once(method):
    model = gqa_model()
    graphs = []
    options = {"kv": kv(method, 0.75, head_floor=0.0), "lowering": "eager"}

    def backend(gm, example_inputs):
        graphs.append(gm)
        return sparse_backend(gm, example_inputs, options=options)

    compiled = torch.compile(model.forward, backend=backend)
    with torch.no_grad():
        out = compiled(input_ids=ids(), use_cache=True)
        cache = out.past_key_values
        counts = [head_counts(layer) for layer in cache.layers]
        for step in range(6):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            out = compiled(input_ids=token, past_key_values=cache, position_ids=torch.full((2, 1), T + step))
            for layer, count in zip(cache.layers, counts):
                assert torch.equal(head_counts(layer), count)
                state = slots(layer)
                newest = state[..., POSITION] == state[..., POSITION].amax(-1, keepdim=True)
                assert sorted(state[..., OWNER][newest].long().tolist()) == [0, 0, 1, 1]  # the new token: once per head
    assert [layer.keys.shape[2] for layer in cache.layers] == [T // 4] * 2
    assert len(graphs) == 2


@pytest.mark.parametrize("method", ["h2o", "snapkv"])
def test_generate_with_a_padded_batch_is_the_same_on_dynamic_and_static_caches(method):
    """generate() with a left-padded batch through Inductor: a StaticCache's buffers shrink to the
    packed slots (plus room for the tokens to come, without a decode rule) and give the tokens the
    DynamicCache gives."""
    model = gqa_model()
    batch = ids()
    mask = torch.ones_like(batch)
    mask[1, :7], batch[1, :7] = 0, 0
    outputs = {}
    for implementation in ("dynamic", "static"):
        torch.compiler.reset()
        forward = model.forward
        model.forward = torch.compile(forward, backend="sparse", options={"kv": kv(method, 0.75), "strict": True})
        try:
            with torch.no_grad():
                outputs[implementation] = model.generate(
                    batch, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                    output_logits=True, return_dict_in_generate=True,
                    **({} if implementation == "dynamic" else {"cache_implementation": "static"}))
        finally:
            model.forward = forward
    assert torch.equal(outputs["dynamic"].sequences, outputs["static"].sequences)
    torch.testing.assert_close(torch.stack(outputs["static"].logits), torch.stack(outputs["dynamic"].logits),
                               atol=1e-4, rtol=1e-4)
    room = 0 if method == "h2o" else 5  # a StaticCache keeps room for the tokens decoded after the prompt's
    assert [layer.keys.shape[2] for layer in outputs["static"].past_key_values.layers] == [T // 4 + room] * 2


@pytest.mark.parametrize("params, message", [
    ({"head_budgets": "per-layer"}, "head_budgets must be one of uniform, adaptive, got 'per-layer'"),
    ({"head_budgets": "adaptive", "head_floor": 1.5}, "head_floor must be a number in \\[0, 1\\], got 1.5"),
    ({"head_budgets": "adaptive", "method": "tova"}, "needs per_head=True"),
])
def test_bad_head_budgets_name_the_value(params, message):
    options = {"method": "h2o", "compression_ratio": 0.5, **params}
    with pytest.raises(ValueError, match=message):
        build("kv", options.pop("method"), options)
