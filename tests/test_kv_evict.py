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

from .helpers import compiled_generate_matches
from .methods import DECODE_START, DECODE_STEP, DECODE_WINDOW, PREFILL_REFERENCE, kv_options as kv, names

METHODS = names("kv")
DECODE_METHODS = names("kv", SUPPORTS_DECODE=True)
T = 40


def ids(batch=2, length=T, seed=0):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def prefill_cache(model, input_ids, options):
    compiled = torch.compile(model.forward, backend="sparse", options=options)
    with torch.no_grad():
        return compiled(input_ids=input_ids, use_cache=True).past_key_values, compiled


def expected_budget(method, layer, num_layers, length, ratio):
    """The method's own budget (PyramidKV's ramp), which for uniform methods must be the floor of
    the exact product (checked against plain arithmetic)."""
    budget = build("kv", method, kv(method, ratio)).budget(layer, num_layers, length)
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
    lengths = [layer.keys.shape[-2] for layer in cache.layers]
    assert lengths == [expected_budget(method, i, num_layers, T, ratio) for i in range(num_layers)]
    assert [layer.values.shape[-2] for layer in cache.layers] == lengths
    if method == "pyramidkv" and ratio == 0.5:
        assert lengths[0] > lengths[-1] and sum(lengths) == num_layers * T // 2  # a pyramid, same total


def test_config_object_works_like_its_dict():
    model = models.tiny_llama()
    cache, _ = prefill_cache(model, ids(), {"kv": compile_sparse.TOVAConfig(compression_ratio=0.5), "lowering": "eager"})
    assert [layer.keys.shape[-2] for layer in cache.layers] == [20, 20]
    assert compile_sparse.parse_options({"kv": {"method": "tova", "compression_ratio": 0.5}}).to_dict()["kv"] == \
        {"method": "tova", "compression_ratio": 0.5, "decode": True}


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
    for layer, (probs, dense_layer, kept) in enumerate(zip(dense.attentions, dense.past_key_values.layers,
                                                           cache.layers)):
        scores = PREFILL_REFERENCE[method](probs, dense_layer.keys, heads // kv_heads)
        budget = expected_budget(method, layer, 2, T, 0.5)
        index = scores.topk(budget, dim=-1).indices.sort(dim=-1).values  # (B, Hkv, K)
        gather = index[..., None].expand(-1, -1, -1, dense_layer.keys.shape[-1])
        torch.testing.assert_close(kept.keys, dense_layer.keys.gather(2, gather))
        torch.testing.assert_close(kept.values, dense_layer.values.gather(2, gather))


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


def _evict(layer, scores, budget, state=None):
    """Keep the ``budget`` highest scores of one layer (in cache order): keys, values and state."""
    index = scores.topk(budget, dim=-1).indices.sort(dim=-1).values  # (B, Hkv, K)
    gather = index[..., None].expand(-1, -1, -1, layer.keys.shape[-1])
    layer.keys, layer.values = layer.keys.gather(2, gather), layer.values.gather(2, gather)
    return None if state is None else tuple(x.gather(2, index) for x in state)


def _decode_reference(method, model, prompt, steps):
    """Plain torch over the eager model's attention: the prefill keeps the budget by the method's
    reference scores; every decode step adds the new token and evicts the one with the lowest
    score outside the newest DECODE_WINDOW tokens. Returns the final keys per layer."""
    budget = T // 4
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True, output_attentions=True)
    cache = out.past_key_values
    states = []
    for probs, layer in zip(out.attentions, cache.layers):
        state = DECODE_START[method](probs, group)
        states.append(_evict(layer, PREFILL_REFERENCE[method](probs, layer.keys, group), budget, state))
    for step in range(steps):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        with torch.no_grad():
            out = model(input_ids=token, past_key_values=cache, position_ids=torch.full((prompt.shape[0], 1), T + step),
                        use_cache=True, output_attentions=True)
        for i, (probs, layer) in enumerate(zip(out.attentions, cache.layers)):  # probs (B, H, 1, P + 1)
            length = layer.keys.shape[2]
            if DECODE_STEP[method] is None:  # StreamingLLM: the oldest token after the 4 sinks goes
                scores = torch.arange(length).float().expand(*layer.keys.shape[:2], -1).clone()
                scores[..., :4] = float("inf")
            else:
                scores, states[i] = DECODE_STEP[method](states[i], probs[:, :, 0], group)
            window = DECODE_WINDOW[method]
            if window:
                scores[..., -window:] = float("inf")
            states[i] = _evict(layer, scores, budget, states[i])
    return [layer.keys for layer in cache.layers]


@pytest.mark.parametrize("method", DECODE_METHODS)
def test_decode_eviction_matches_a_plain_reference_and_resets_on_prefill(method):
    reference_model = models.tiny_llama(attn_implementation="eager")
    model = models.tiny_llama()
    prompt = ids()
    expected = _decode_reference(method, reference_model, prompt, steps=5)
    compiled = torch.compile(model.forward, backend="sparse", options={"kv": kv(method, 0.75), "lowering": "eager"})
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
                             return_dict_in_generate=True)
    del model.forward
    assert [layer.keys.shape[-2] for layer in out.past_key_values.layers] == [20, 20]
    eager = models.tiny_llama()  # the same eviction through eager lowering: the same tokens
    eager.forward = torch.compile(eager.forward, backend="sparse", options={"kv": kv("tova", 0.5), "lowering": "eager"})
    with torch.no_grad():
        expected = eager.generate(ids(), max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out.sequences, expected)


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


def test_static_cache_is_refused_with_the_reason():
    model = models.tiny_llama()
    with pytest.raises(compile_sparse.PassError, match="StaticCache"):
        compile_sparse.explain(model.generate, ids(), max_new_tokens=2, do_sample=False, pad_token_id=0,
                               cache_implementation="static", options={"kv": kv("h2o", 0.5)})


@pytest.mark.parametrize("options, message", [
    ({"method": "h2o", "compression_ratio": 1.0}, "compression_ratio must be a number in \\[0, 1\\), got 1.0"),
    ({"method": "snapkv", "compression_ratio": -0.1}, "got -0.1"),
    ({"method": "snapkv", "decode": True}, "SnapKVConfig has no decode rule .* got True"),
    ({"method": "snapkv", "kernel_size": 4}, "kernel_size must be odd, got 4"),
    ({"method": "streaming_llm", "n_sink": 0}, "n_sink must be an int >= 1, got 0"),
    ({"method": "hitkv", "budgets": "fancy"}, "budgets must be one of uniform, pyramid, got 'fancy'"),
    ({"method": "h2o", "recent_window": -1}, "recent_window must be an int >= 0, got -1"),
    ({"method": "pyramidkv", "beta": 0}, "beta must be an int >= 1, got 0"),
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
