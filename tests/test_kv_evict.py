"""KV-cache eviction: identity at ratio 0, exact budgets, the tokens each scorer keeps (against a
reference computed from the eager model's full attention), decode at a fixed size with state,
GQA, batches, a second architecture, and clear refusals."""

import math

import pytest
import torch

import compile_sparse
from compile_sparse import models
from compile_sparse.backend import sparse_backend
from compile_sparse.passes.kv import scoring
from compile_sparse.passes.kv.budgets import uniform_budget
from compile_sparse.passes.registry import build
from compile_sparse.state import STATE

from .helpers import compiled_generate_matches, generate
from .methods import DECODE, MODEL_REFERENCE, PREFILL_REFERENCE, kv_options as kv, names

METHODS = names("kv", REREAD=False)  # a re-read method (kvzip) compresses in compress_context: tests/test_kvzip.py
DECODE_METHODS = names("kv", SUPPORTS_DECODE=True)
T = 40


def ids(batch=2, length=T, seed=0):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def prefill_cache(model, input_ids, options):
    compiled = torch.compile(model.forward, backend="sparse", options=options)
    with torch.no_grad():
        return compiled(input_ids=input_ids, use_cache=True).past_key_values, compiled


def real_slots(layer):
    """Slots holding a token, per row and KV head (B, Hkv): from the state the backend keeps."""
    return (STATE.store.get(layer.keys)[..., 0] >= 0).sum(-1)


def expected_budget(method, layer, num_layers, length, ratio):
    """The method's own budget (PyramidKV's ramp), which for uniform methods must be the floor of
    the exact product (checked against plain arithmetic)."""
    params = {k: v for k, v in kv(method, ratio).items() if k != "method"}
    budget = build("kv", method, params).budget(layer, num_layers, length)
    if method not in ("pyramidkv",):
        assert budget == max(1, math.floor(round(length * (1 - ratio), 9)))
    return budget


# ---------------------------------------------------------------------------------------------
# Identity and exact structure
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-gpt2", "tiny-gpt2-eager"])
@pytest.mark.parametrize("method", METHODS)
def test_ratio_zero_generates_exactly_dense(model_name, method):
    model, _ = models.load(model_name)
    compiled_generate_matches(model, ids(), {"kv": kv(method, 0.0), "lowering": "eager"}, steps=6)


@pytest.mark.parametrize("method", ["h2o", "streaming_llm"])
def test_ratio_zero_through_inductor_equals_dense(method):
    compiled_generate_matches(models.tiny_llama(), ids(), {"kv": kv(method, 0.0)}, steps=4)


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-gpt2", "tiny-gpt2-eager"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ratio", [0.5, 0.9])
def test_prefill_leaves_exactly_the_budget_in_every_layer(model_name, method, ratio):
    model, _ = models.load(model_name)
    cache, _ = prefill_cache(model, ids(), {"kv": kv(method, ratio), "lowering": "eager"})
    num_layers = len(cache.layers)
    budgets = [expected_budget(method, i, num_layers, T, ratio) for i in range(num_layers)]
    real = [int(real_slots(layer).min()) for layer in cache.layers]  # tokens held, per layer, every row and head
    assert real == [int(real_slots(layer).max()) for layer in cache.layers] == budgets
    # the tensors: the budget, or with per-layer budgets the widest (one attention mask serves every layer)
    assert [layer.keys.shape[-2] for layer in cache.layers] == [max(budgets)] * num_layers
    assert [layer.values.shape[-2] for layer in cache.layers] == [max(budgets)] * num_layers
    if method == "pyramidkv" and ratio == 0.5:
        assert budgets[0] > budgets[-1] and sum(budgets) == num_layers * T // 2  # a pyramid, same total


@pytest.mark.parametrize("method", METHODS)
def test_one_and_two_token_prompts_keep_their_budget(method):
    """The shortest prompts a generate() call can bring: every method keeps its budget (one token:
    that token), with nothing skipped ("strict")."""
    model = models.tiny_llama()
    for length in (1, 2):
        torch.compiler.reset()
        cache, _ = prefill_cache(model, ids(length=length), {"kv": kv(method, 0.5), "lowering": "eager", "strict": True})
        assert [int(real_slots(layer).min()) for layer in cache.layers] == [1, 1]


def test_config_object_works_like_its_dict():
    model = models.tiny_llama()
    cache, _ = prefill_cache(model, ids(), {"kv": compile_sparse.TOVAConfig(compression_ratio=0.5), "lowering": "eager"})
    assert [layer.keys.shape[-2] for layer in cache.layers] == [20, 20]
    assert compile_sparse.parse_options({"kv": {"method": "tova", "compression_ratio": 0.5}}).to_dict()["kv"] == \
        {"method": "tova", "compression_ratio": 0.5, "decode": True, "head_budgets": "uniform", "head_floor": 0.2,
         "kernel_size": 1, "per_head": False}


def test_budgets_match_kvpress_convention():
    assert [uniform_budget(n, 0.9) for n in (1024, 4096, 7, 1)] == [102, 409, 1, 1]
    assert uniform_budget(1024, 0.75) == 256


def test_inductor_cache_equals_eager_lowering_cache():
    model = models.tiny_llama()
    options = {"kv": kv("h2o", 0.5)}
    eager_cache, _ = prefill_cache(model, ids(), {**options, "lowering": "eager"})
    torch.compiler.reset()
    inductor_cache, _ = prefill_cache(model, ids(), options)
    for a, b in zip(eager_cache.layers, inductor_cache.layers):
        torch.testing.assert_close(b.keys, a.keys)
        torch.testing.assert_close(b.values, a.values)


# ---------------------------------------------------------------------------------------------
# What each scorer keeps, against a reference from the eager model's full attention
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_kept_tokens_match_full_attention_reference(method, monkeypatch):
    monkeypatch.setattr(scoring, "SCORE_CHUNK", 16)  # 40 queries: chunks of 16, 16 and 8
    heads, kv_heads = 6, 2
    reference_model = models.tiny_llama(heads=heads, kv_heads=kv_heads, attn_implementation="eager")
    model = models.tiny_llama(heads=heads, kv_heads=kv_heads)  # same seed: same weights, SDPA attention
    input_ids = ids()
    with torch.no_grad():
        dense = reference_model(input_ids=input_ids, use_cache=True, output_attentions=True)
    cache, _ = prefill_cache(model, input_ids, {"kv": kv(method, 0.5), "lowering": "eager"})
    from_model = MODEL_REFERENCE[method](reference_model, input_ids) if method in MODEL_REFERENCE else None
    for layer, (probs, dense_layer, kept) in enumerate(zip(dense.attentions, dense.past_key_values.layers,
                                                           cache.layers)):
        scores = from_model[layer] if from_model else PREFILL_REFERENCE[method](probs, dense_layer.keys, heads // kv_heads)
        budget = expected_budget(method, layer, 2, T, 0.5)
        index = scores.topk(budget, dim=-1).indices.sort(dim=-1).values  # (B, Hkv, K)
        gather = index[..., None].expand(-1, -1, -1, dense_layer.keys.shape[-1])
        torch.testing.assert_close(kept.keys[:, :, :budget], dense_layer.keys.gather(2, gather))
        torch.testing.assert_close(kept.values[:, :, :budget], dense_layer.values.gather(2, gather))


def test_streaming_llm_keeps_sinks_and_the_most_recent_tokens():
    model = models.tiny_llama()
    with torch.no_grad():
        dense = model(input_ids=ids(), use_cache=True).past_key_values
    cache, _ = prefill_cache(model, ids(), {"kv": kv("streaming_llm", 0.75, n_sink=3), "lowering": "eager"})
    kept = list(range(3)) + list(range(T - 7, T))  # 10 = floor(40 * 0.25) tokens
    for dense_layer, layer in zip(dense.layers, cache.layers):
        torch.testing.assert_close(layer.keys, dense_layer.keys[:, :, kept])


def test_batch_rows_are_selected_independently():
    model = models.tiny_llama()
    batch = ids(batch=2, seed=3)
    options = {"kv": kv("h2o", 0.75), "lowering": "eager"}
    cache, _ = prefill_cache(model, batch, options)
    for row in range(2):
        torch.compiler.reset()
        single, _ = prefill_cache(model, batch[row:row + 1], options)
        for layer, single_layer in zip(cache.layers, single.layers):
            torch.testing.assert_close(layer.keys[row:row + 1], single_layer.keys)
    assert not torch.equal(cache.layers[0].keys[0], cache.layers[0].keys[1])


# ---------------------------------------------------------------------------------------------
# Decode: fixed size, one compile, state owned by the backend
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("method", DECODE_METHODS)
def test_decode_holds_the_budget_and_compiles_once(model_name, method):
    model, _ = models.load(model_name)
    graphs = []
    options = {"kv": kv(method, 0.75), "lowering": "eager"}

    def backend(gm, example_inputs):
        graphs.append(gm)
        return sparse_backend(gm, example_inputs, options=options)

    eager_forward = model.forward
    model.forward = torch.compile(eager_forward, backend=backend)
    try:
        with torch.no_grad():
            out = model.generate(ids(), max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0,
                                 return_dict_in_generate=True)
    finally:
        model.forward = eager_forward
    assert [layer.keys.shape[-2] for layer in out.past_key_values.layers] == [10, 10]
    assert len(graphs) == 2  # the prefill and one decode graph: the cache size never changes


@pytest.mark.parametrize("method", ["snapkv", "knorm", "pyramidkv"])
def test_prompt_only_methods_let_the_cache_grow_in_decode(method):
    model = models.tiny_llama()
    cache, compiled = prefill_cache(model, ids(), {"kv": kv(method, 0.75), "lowering": "eager"})
    before = [layer.keys.shape[-2] for layer in cache.layers]
    with torch.no_grad():
        compiled(input_ids=ids(length=1), past_key_values=cache, position_ids=torch.full((2, 1), T))
    assert [layer.keys.shape[-2] for layer in cache.layers] == [n + 1 for n in before]


def _gather(tensor, index):
    return tensor.gather(2, index[..., None].expand(-1, -1, -1, tensor.shape[-1]))


def _tova_per_head(probs, group):
    """TOVA per KV head: the rows of the newest query (B, H, T) -> their mean per group (B, Hkv, T)."""
    return probs.unflatten(1, (-1, group)).mean(2)


# references of method variants: (method, parameters) -> (prefill scores, decode rule), as in tests/methods.py
VARIANTS = {("tova", "per_head"): (lambda probs, keys, group: _tova_per_head(probs[:, :, -1], group),
                                   (lambda probs, group: None, lambda state, probs, group: (_tova_per_head(probs, group), None), 0))}


def _decode_reference(method, model, prompt, steps, variant=None):
    """Plain torch over the eager model's attention. The prefill keeps the budget by the method's
    reference scores (or its ``variant``'s in VARIANTS). Each decode step drops the slot with the
    lowest score of the previous call, runs the model over the other slots and the new token, and
    puts the new token in the freed slot; its query's attention then gives the new scores. Returns
    the final keys per layer."""
    budget = T // 4
    prefill_rule, (start, step_rule, window) = VARIANTS[method, variant] if variant else (PREFILL_REFERENCE[method],
                                                                                         DECODE[method])
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True, output_attentions=True)
    cache, layers = out.past_key_values, []
    for probs, layer in zip(out.attentions, cache.layers):
        scores = prefill_rule(probs, layer.keys, group)
        index = scores.topk(budget, dim=-1).indices.sort(dim=-1).values  # (B, Hkv, K), in position order
        state = start(probs, group)
        layer.keys, layer.values = _gather(layer.keys, index), _gather(layer.values, index)
        layers.append({"priority": scores.gather(2, index), "positions": index.float(),
                       "state": None if state is None else [x.gather(2, index) for x in state]})
    slot = torch.arange(budget)
    for step in range(steps):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        victims = []
        for layer, kept in zip(cache.layers, layers):
            victim = kept["priority"].argmin(dim=-1, keepdim=True)  # (B, Hkv, 1)
            others = (slot + (slot == victim) * budget).argsort(dim=-1)[..., :-1]  # every slot but the victim
            layer.keys, layer.values = _gather(layer.keys, others), _gather(layer.values, others)
            victims.append(victim)
        with torch.no_grad():
            out = model(input_ids=token, past_key_values=cache, position_ids=torch.full((prompt.shape[0], 1), T + step),
                        use_cache=True, output_attentions=True)
        for probs, layer, kept, victim in zip(out.attentions, cache.layers, layers, victims):
            # slot s holds: the new token (last in the model's cache) at the victim, the others in order
            perm = torch.where(slot < victim, slot, torch.where(slot == victim, budget - 1, slot - 1))  # (B, Hkv, K)
            layer.keys, layer.values = _gather(layer.keys, perm), _gather(layer.values, perm)
            probs = probs[:, :, 0].gather(-1, perm.repeat_interleave(group, dim=1))  # (B, H, K) in slot order
            positions = kept["positions"].scatter(2, victim, float(T + step))
            if step_rule is None:  # StreamingLLM: positions, the 4 sinks above everything
                scores = torch.where(positions < 4, float("inf"), positions)
            else:
                state = None if kept["state"] is None else [x.scatter(2, victim, 0.0) for x in kept["state"]]
                scores, kept["state"] = step_rule(state, probs, group)
            if window:
                scores = torch.where(positions > T + step - window, float("inf"), scores)
            kept["priority"], kept["positions"] = scores, positions
    return [layer.keys for layer in cache.layers]


@pytest.mark.parametrize("method, variant", [(m, None) for m in DECODE_METHODS] + list(VARIANTS))
def test_decode_eviction_matches_a_plain_reference_and_resets_on_prefill(method, variant):
    reference_model = models.tiny_llama(attn_implementation="eager")
    model = models.tiny_llama()
    prompt = ids()
    expected = _decode_reference(method, reference_model, prompt, steps=5, variant=variant)
    options = kv(method, 0.75, **({variant: True} if variant else {}))
    compiled = torch.compile(model.forward, backend="sparse", options={"kv": options, "lowering": "eager"})
    for _ in range(2):  # the second prefill starts fresh scores: same result again
        with torch.no_grad():
            out = compiled(input_ids=prompt, use_cache=True)
            cache = out.past_key_values
            for step in range(5):
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                out = compiled(input_ids=token, past_key_values=cache, position_ids=torch.full((2, 1), T + step))
        for keys, layer in zip(expected, cache.layers):
            torch.testing.assert_close(layer.keys, keys)


def test_decode_on_a_cache_the_backend_did_not_produce_is_an_error():
    model = models.tiny_llama()
    _, compiled = prefill_cache(model, ids(), {"kv": kv("h2o", 0.75), "lowering": "eager"})
    with torch.no_grad():
        foreign = model(input_ids=ids(), use_cache=True).past_key_values  # plain eager prefill
        with pytest.raises(RuntimeError, match="was not produced by this backend's eviction"):
            compiled(input_ids=ids(length=1), past_key_values=foreign, position_ids=torch.full((2, 1), T))


def test_generate_with_eviction_through_inductor():
    model = models.tiny_llama()
    model.forward = torch.compile(model.forward, backend="sparse", options={"kv": kv("tova", 0.5)})
    with torch.no_grad():
        out = model.generate(ids(), max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
    del model.forward
    assert [layer.keys.shape[-2] for layer in out.past_key_values.layers] == [20, 20]
    eager = models.tiny_llama()  # the same eviction through eager lowering: the same tokens and logits
    eager.forward = torch.compile(eager.forward, backend="sparse", options={"kv": kv("tova", 0.5), "lowering": "eager"})
    expected, expected_logits = generate(eager, ids(), steps=6)
    assert torch.equal(out.sequences, expected)
    torch.testing.assert_close(torch.stack(out.logits), expected_logits, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Explain and refusals
# ---------------------------------------------------------------------------------------------


def test_explain_counts_rewrites_and_kv_bytes():
    model = models.tiny_llama()
    report = compile_sparse.explain(model, input_ids=ids(), use_cache=True, options={"kv": kv("snapkv", 0.75)})
    (result,) = report.passes
    assert result["rewrites"] == {"prefill eviction": 2}
    per_token = 2 * 2 * 16 * 4 * 2  # K and V, 2 KV heads, head dim 16, fp32, batch 2, per layer
    assert result["kv_cache_bytes"] == {"before": 2 * T * per_token, "after": 2 * 10 * per_token}
    assert result["sites"]["layer 1 attention"] == "prefill eviction: cache 40 -> 10 tokens"
    assert "KV cache handed back: 40.0 KiB -> 10.0 KiB (75% saved)" in str(report)


def test_without_a_cache_nothing_is_evicted_and_explain_says_so():
    report = compile_sparse.explain(models.tiny_llama(), input_ids=ids(), use_cache=False, options={"kv": "h2o"})
    assert report.passes[0]["rewrites"] == {}
    assert "nothing to evict" in report.passes[0]["sites"]["graph"]


@pytest.mark.parametrize("options, message", [
    ({"method": "h2o", "compression_ratio": 1.0}, "compression_ratio must be a number in \\[0, 1\\), got 1.0"),
    ({"method": "snapkv", "compression_ratio": -0.1}, "got -0.1"),
    ({"method": "snapkv", "decode": True}, "SnapKVConfig has no decode rule .* got True"),
    ({"method": "snapkv", "kernel_size": 4}, "kernel_size must be odd, got 4"),
    ({"method": "streaming_llm", "n_sink": 0}, "n_sink must be an int >= 1, got 0"),
    ({"method": "hitkv", "budgets": "fancy"}, "budgets must be one of uniform, pyramid, got 'fancy'"),
    ({"method": "h2o", "recent_window": -1}, "recent_window must be an int >= 0, got -1"),
    ({"method": "pyramidkv", "beta": 0}, "beta must be an int >= 1, got 0"),
    ({"method": "tova", "per_head": 1}, "per_head must be True or False, got 1"),
])
def test_bad_parameters_name_the_value(options, message):
    with pytest.raises(ValueError, match=message):
        compile_sparse.parse_options({"kv": options})


@pytest.mark.parametrize("method", ["snapkv", "h2o", "hitkv"])
def test_a_budget_smaller_than_the_protected_window_keeps_the_newest_tokens(method):
    model = models.tiny_llama()
    with torch.no_grad():
        dense = model(input_ids=ids(), use_cache=True).past_key_values
    window = {"snapkv": "window_size", "h2o": "recent_window", "hitkv": "recent_window"}[method]
    cache, _ = prefill_cache(model, ids(), {"kv": kv(method, 0.75, **{window: 32}), "lowering": "eager"})
    for dense_layer, layer in zip(dense.layers, cache.layers):
        torch.testing.assert_close(layer.keys, dense_layer.keys[:, :, -10:])


@pytest.mark.parametrize("per_head", [False, True])
def test_tova_pooled_keeps_the_topk_of_the_pooled_reference(per_head):
    """TOVA with kernel_size 5: the last query's attention (mean over every head, or per KV head
    over its group) averaged over 5 neighbouring positions."""
    heads, kv_heads = 6, 2
    reference_model = models.tiny_llama(heads=heads, kv_heads=kv_heads, attn_implementation="eager")
    model = models.tiny_llama(heads=heads, kv_heads=kv_heads)
    input_ids = ids()
    with torch.no_grad():
        dense = reference_model(input_ids=input_ids, use_cache=True, output_attentions=True)
    options = {"kv": kv("tova", 0.5, kernel_size=5, per_head=per_head), "lowering": "eager"}
    cache, _ = prefill_cache(model, input_ids, options)
    for probs, dense_layer, kept in zip(dense.attentions, dense.past_key_values.layers, cache.layers):
        if per_head:
            tova = probs[:, :, -1].unflatten(1, (kv_heads, heads // kv_heads)).mean(2)  # (B, Hkv, T)
        else:
            tova = PREFILL_REFERENCE["tova"](probs, dense_layer.keys, heads // kv_heads)  # (B, Hkv, T)
        pooled = torch.nn.functional.avg_pool1d(tova, 5, stride=1, padding=2, count_include_pad=False)
        index = pooled.topk(T // 2, dim=-1).indices.sort(dim=-1).values
        gather = index[..., None].expand(-1, -1, -1, dense_layer.keys.shape[-1])
        torch.testing.assert_close(kept.keys, dense_layer.keys.gather(2, gather))


def test_pooling_by_position_ignores_slot_order_and_empty_slots():
    from compile_sparse.passes.kv.scoring import pool_by_position, pool_scores

    scores = torch.rand(2, 3, 12)
    in_order = pool_scores(scores, 5)
    slots = torch.randperm(12)
    positions = torch.arange(12.0)[slots].expand(2, 3, 12)  # slot j holds position slots[j]
    pooled = pool_by_position(scores[..., slots], positions, 5)
    torch.testing.assert_close(pooled, in_order[..., slots])
    empty = positions.clone()
    empty[..., 0] = -1  # an empty slot: no neighbour, its score unchanged
    pooled = pool_by_position(scores[..., slots], empty, 5)
    assert torch.equal(pooled[..., 0], scores[..., slots][..., 0])
