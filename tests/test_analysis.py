"""The analysis finds exactly one attention site and one MLP site per layer, with the right details."""

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

import compile_sparse
from compile_sparse import models


# name -> (layers, q heads, kv heads, head dim, causal, cache kind, form, fused qkv, gated, activation, intermediate)
TINY = {
    "tiny-llama": (2, 4, 2, 16, True, "concat", "sdpa", False, True, "silu", 96),
    "tiny-gpt2": (2, 4, 4, 16, True, "concat", "sdpa", True, False, "gelu_tanh", 256),
    "tiny-gpt2-eager": (2, 4, 4, 16, True, "concat", "matmul_softmax", True, False, "gelu_tanh", 256),
    "tiny-bert": (2, 4, 4, 16, False, None, "sdpa", False, False, "gelu", 256),
    "tiny-vit": (2, 4, 4, 16, False, None, "sdpa", False, False, "gelu", 256),
    "nanogpt": (2, 4, 4, 16, True, None, "matmul_softmax", True, False, "gelu", 256),
}


@pytest.mark.parametrize("name", list(TINY))
def test_zoo_sites(name):
    layers, heads, kv_heads, head_dim, causal, cache, form, fused, gated, act, inter = TINY[name]
    model, tok = models.load(name)
    report = compile_sparse.explain(model, **models.sample_inputs(name, model, tok, seq_len=12))
    assert report.totals()["attention_sites"] == layers
    assert report.totals()["mlp_sites"] == layers
    assert report.skipped == []
    assert [s["layer"] for s in report.attention_sites] == list(range(layers))
    assert [s["layer"] for s in report.mlp_sites] == list(range(layers))
    for s in report.attention_sites:
        assert (s["num_heads"], s["num_kv_heads"], s["head_dim"], s["causal"]) == (heads, kv_heads, head_dim, causal)
        assert (s["form"], s["qkv_fused"], s["seq_axis"]) == (form, fused, 2)
        assert (s["cache"]["kind"] if s["cache"] else None) == cache
        assert all(w is not None for w in s["weights"].values())
        assert s["rope"] == (name == "tiny-llama")  # q * cos + rotate_half(q) * sin found at the query
    for s in report.mlp_sites:
        assert (s["gated"], s["activation"], s["intermediate_size"]) == (gated, act, inter)
        assert s["hidden_size"] == heads * head_dim
    expected_kv = layers * 2 * kv_heads * head_dim * 4 if cache else 0
    assert report.totals()["kv_bytes_per_token"] == expected_kv


def test_parameter_counts_match_the_modules():
    model = models.tiny_llama(layers=3)
    report = compile_sparse.explain(model, input_ids=torch.randint(0, 128, (1, 8)))
    attn = sum(p.numel() for n, p in model.named_parameters() if ".self_attn." in n)
    mlp = sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)
    assert report.totals()["attention_params"] == attn
    assert report.totals()["mlp_params"] == mlp


def test_llama_decode_graph_with_dynamic_cache():
    model = models.tiny_llama()
    ids = torch.randint(0, 128, (2, 9))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    report = compile_sparse.explain(model, input_ids=ids[:, -1:], past_key_values=cache,
                                    position_ids=torch.full((2, 1), 9), options={"recipe": "dense"})
    assert len(report.attention_sites) == 2
    for s in report.attention_sites:
        assert (s["q_len"], s["kv_len"], s["causal"]) == (1, 10, True)
        assert s["cache"]["kind"] == "concat"
        assert "past_key_values" in s["cache"]["k_input"] and "past_key_values" in s["cache"]["v_input"]
        assert s["cache"]["k_output"] is not None and s["cache"]["seq_axis"] == 2


def test_llama_static_cache_prefill_and_decode():
    model = models.tiny_llama()
    reports = []

    def capture(gm, example_inputs):
        reports.append(compile_sparse.analyze(gm, example_inputs))
        return gm.forward

    model.forward = torch.compile(model.forward, backend=capture)
    with torch.no_grad():
        model.generate(torch.randint(0, 128, (1, 7)), max_new_tokens=3, do_sample=False,
                       cache_implementation="static", pad_token_id=0)
    assert len(reports) >= 2  # prefill and decode graphs
    for analysis in reports:
        assert len(analysis.attention) == 2 and len(analysis.mlp) == 2
        for site in analysis.attention:
            assert site.k_cache.kind == "index_copy" and site.v_cache.kind == "index_copy"
            assert site.k_cache.seq_axis == 2 and site.causal is True
            assert (site.num_heads, site.num_kv_heads) == (4, 2)
    decode = reports[-1]
    assert all(s.k_cache.input.op == "placeholder" for s in decode.attention)


def test_causality_is_read_from_the_mask_without_a_cache():
    model = models.tiny_gpt2(attn_implementation="eager")
    report = compile_sparse.explain(model, input_ids=torch.randint(0, 128, (1, 6)), use_cache=False)
    assert [s["causal"] for s in report.attention_sites] == [True, True]
    assert all(s["cache"] is None for s in report.attention_sites)


def test_bert_padding_mask_is_not_causal():
    model = models.tiny_bert()
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    report = compile_sparse.explain(model, input_ids=torch.randint(0, 128, (2, 6)), attention_mask=mask)
    assert [s["causal"] for s in report.attention_sites] == [False, False]


def test_model_without_attention_runs_unchanged_and_reports_why():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)).eval()
    x = torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="sparse")(x), model(x), atol=1e-6, rtol=1e-6)
    report = compile_sparse.explain(model, x)
    assert report.totals()["attention_sites"] == 0 and report.totals()["mlp_sites"] == 0
    assert any("no attention and no MLP found" in n for n in report.notes())
    assert "no attention and no MLP found" in str(report)


def test_attention_on_raw_tensors_is_skipped_not_rewritten():
    """q, k, v that come from no projection: the analysis cannot tie the attention to weights."""
    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    report = compile_sparse.explain(attend, q, k, v)
    assert report.attention_sites == []
    assert len(report.skipped) == 1
    assert report.skipped[0]["kind"] == "attention"
    assert "no projection" in report.skipped[0]["reason"]


class OddScores(torch.nn.Module):
    """Attention whose scores pass an op the analysis does not know (sin): skipped, not matched."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(8, 8) for _ in range(4))

    def forward(self, x):  # x: (B, T, 8), one head
        scores = torch.sin(self.q(x) @ self.k(x).transpose(-1, -2))  # (B, T, T)
        return self.o(torch.softmax(scores, dim=-1) @ self.v(x))


def test_matmul_softmax_with_unknown_score_op_is_skipped():
    report = compile_sparse.explain(OddScores().eval(), torch.randn(2, 5, 8))
    assert report.attention_sites == []
    assert [s["kind"] for s in report.skipped] == ["attention"]
    assert "scores do not come from matmul(q, k^T)" in report.skipped[0]["reason"]


def test_softmax_that_is_not_attention_is_ignored():
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Softmax(dim=-1)).eval()
    report = compile_sparse.explain(model, torch.randn(2, 8))
    assert report.attention_sites == [] and report.skipped == []


class ThreeWayMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Linear(8, 16) for _ in range(3))
        self.down = torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.down(F.silu(self.a(x)) * self.b(x) * self.c(x))


def test_mlp_with_three_projections_is_skipped():
    report = compile_sparse.explain(ThreeWayMLP().eval(), torch.randn(2, 8))
    assert report.mlp_sites == []
    assert [s["kind"] for s in report.skipped] == ["mlp"]
    assert "3 projections" in report.skipped[0]["reason"]


class SDPABlock(torch.nn.Module):
    """A block written for torch.fx.symbolic_trace: x (B, T, 32) -> (B, T, 32)."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = torch.nn.Linear(32, 96), torch.nn.Linear(32, 32)
        self.up, self.down = torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.view(x.shape[0], x.shape[1], 2, 16).transpose(1, 2) for t in (q, k, v))  # (B, 2, T, 16)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(x.shape)  # (B, T, 32)
        x = x + self.out(y)
        return x + self.down(F.relu(self.up(x)))


def test_transform_on_a_symbolic_trace():
    model = SDPABlock().eval()
    with pytest.raises(ValueError, match="is_leaf_module"):
        compile_sparse.transform(torch.fx.symbolic_trace(model), [torch.randn(2, 5, 32)])

    class InlineModules(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return False

    gm = torch.fx.GraphModule(model, InlineModules().trace(model))
    x = torch.randn(2, 5, 32)
    out = compile_sparse.transform(gm, [x])
    analysis = compile_sparse.analyze(out, [x])
    assert len(analysis.attention) == 1 and len(analysis.mlp) == 1
    site = analysis.attention[0]
    assert (site.num_heads, site.num_kv_heads, site.head_dim, site.causal, site.qkv_fused) == (2, 2, 16, True, True)
    assert analysis.mlp[0].activation == "relu" and analysis.mlp[0].intermediate_size == 64
    torch.testing.assert_close(out(x), model(x), atol=0, rtol=0)


def test_transform_prunes_a_symbolic_trace():
    """Pruning a torch.fx trace: dotted get_attr weights are read, and shapes propagate from the
    meta example values the trace records."""
    model = SDPABlock().eval()

    class InlineModules(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return False

    gm = torch.fx.GraphModule(model, InlineModules().trace(model))
    x = torch.randn(2, 5, 32)
    out = compile_sparse.transform(gm, [x], {"prune": {"method": "magnitude", "mlp_ratio": 0.5}})
    assert out.pruned_up_weight.shape == (32, 32) and out.pruned_down_weight.shape == (32, 32)
    assert out(x).shape == (2, 5, 32)
