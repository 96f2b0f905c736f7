"""Random small Llama and GPT-2 configs: the analysis counts match the config, compiled equals eager."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import compile_sparse
from compile_sparse import models
from compile_sparse.passes.kv.scoring import KVConfig
from compile_sparse.passes.registry import build

from .methods import names


SETTINGS = dict(max_examples=4, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _check(model, layers, heads, kv_heads, head_dim, intermediate, gated):
    torch.compiler.reset()  # every example compiles a new model: no recompile limit across examples
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    report = compile_sparse.explain(model, input_ids=ids)
    assert report.totals()["attention_sites"] == layers and report.totals()["mlp_sites"] == layers
    assert report.skipped == []
    for s in report.attention_sites:
        assert (s["num_heads"], s["num_kv_heads"], s["head_dim"], s["causal"]) == (heads, kv_heads, head_dim, True)
    for s in report.mlp_sites:
        assert (s["intermediate_size"], s["gated"]) == (intermediate, gated)
    with torch.no_grad():
        ref = model(ids).logits
        torch.compiler.reset()
        out = torch.compile(model, backend="sparse", fullgraph=True)(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1.3e-6)


@st.composite
def llama_configs(draw):
    kv_heads = draw(st.integers(1, 3))
    heads = kv_heads * draw(st.integers(1, 3))
    return dict(layers=draw(st.integers(1, 3)), heads=heads, kv_heads=kv_heads,
                head_dim=draw(st.sampled_from([8, 16])), intermediate=draw(st.integers(8, 80)))


@given(llama_configs())
@settings(**SETTINGS)
def test_random_llama(cfg):
    model = models.tiny_llama(**cfg)
    _check(model, cfg["layers"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"], cfg["intermediate"], gated=True)


@given(layers=st.integers(1, 3), heads=st.integers(1, 4), head_dim=st.sampled_from([8, 16]),
       attn=st.sampled_from(["sdpa", "eager"]))
@settings(**SETTINGS)
def test_random_gpt2(layers, heads, head_dim, attn):
    model = models.tiny_gpt2(layers=layers, heads=heads, head_dim=head_dim, attn_implementation=attn)
    _check(model, layers, heads, heads, head_dim, 4 * heads * head_dim, gated=False)


@given(cfg=llama_configs(), length=st.integers(2, 30), ratio=st.sampled_from([0.0, 0.3, 0.5, 0.8]),
       method=st.sampled_from(names("kv", REREAD=False)))
@settings(**SETTINGS)
def test_random_llama_kv_eviction(cfg, length, ratio, method):
    """The prefill cache holds exactly the budget in every layer; ratio 0 changes nothing."""
    model = models.tiny_llama(**cfg)
    ids = torch.randint(0, 128, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        dense = model(ids, use_cache=True)
        torch.compiler.reset()
        compiled = torch.compile(model.forward, backend="sparse",
                                 options={"kv": {"method": method, "compression_ratio": ratio}, "lowering": "eager"})
        out = compiled(ids, use_cache=True)
    config = build("kv", method, {"compression_ratio": ratio})
    layers = len(dense.past_key_values.layers)
    for i, (dense_layer, layer) in enumerate(zip(dense.past_key_values.layers, out.past_key_values.layers)):
        budget = config.budget(i, layers, length)
        if type(config).budget is KVConfig.budget:  # uniform: the floor of the exact product
            assert budget == max(1, int(round(length * (1 - ratio), 9)))
        assert layer.keys.shape == (2, cfg["kv_heads"], budget, cfg["head_dim"]) == layer.values.shape
        if ratio == 0:
            assert torch.equal(layer.keys, dense_layer.keys) and torch.equal(layer.values, dense_layer.values)
    torch.testing.assert_close(out.logits, dense.logits, atol=1e-5, rtol=1.3e-6)  # this call's attention is full
