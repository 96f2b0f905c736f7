"""Structured pruning (MLP neurons, heads), N:M, plans and export: identity at ratio 0, exact
shapes, the channels each criterion keeps (against references computed from the eager model with
hooks), the graph against a physically pruned model, size rewrites, refusals, decode, composition."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import compile_sparse
from compile_sparse import models
from compile_sparse.export import shrink_model
from compile_sparse.passes.prune import plan_build

from .helpers import generate

CRITERIA = ["magnitude", "wanda", "flap", "taylor", "d2prune"]
T = 16


def tiny(**kwargs):
    args = dict(layers=2, heads=6, kv_heads=2, head_dim=8, intermediate=40)
    return models.tiny_llama(**{**args, **kwargs})


def ids(seed=0, length=T, batch=1):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


CALIB = [ids(seed) for seed in range(10, 14)]


def spec(method, **params):
    prune = {"method": method, **params}
    if method != "magnitude":
        prune["calibration"] = CALIB
    return prune


def run(model, prune, input_ids=None, lowering="eager", use_cache=False):
    input_ids = ids() if input_ids is None else input_ids
    compiled = torch.compile(model, backend="sparse", options={"prune": prune, "lowering": lowering})
    with torch.no_grad():
        return compiled(input_ids, use_cache=use_cache).logits


def dense(model, input_ids=None):
    with torch.no_grad():
        return model(ids() if input_ids is None else input_ids, use_cache=False).logits


def plan_of(model, prune, tmp_path, **kwargs):
    path = tmp_path / "plan.json"
    run(model, {**prune, "save_plan": str(path)}, **kwargs)
    return compile_sparse.Plan.load(path)


def down_inputs(model, batches):
    """Per layer, the down projection's input over all calibration tokens: (tokens, I)."""
    acts = {i: [] for i in range(len(model.model.layers))}
    hooks = [layer.mlp.down_proj.register_forward_hook(lambda m, inp, out, i=i: acts[i].append(inp[0].reshape(-1, inp[0].shape[-1])))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for b in batches:
            model(b, use_cache=False)
    for h in hooks:
        h.remove()
    return {i: torch.cat(a).double() for i, a in acts.items()}


# ---------------------------------------------------------------------------------------------
# Identity and structure
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", CRITERIA)
def test_ratio_zero_is_identity(method):
    model = tiny()
    assert torch.equal(run(model, spec(method, mlp_ratio=0.0, head_ratio=0.0)), dense(model))
    report = compile_sparse.explain(model, ids(), use_cache=False, options={"prune": spec(method)})
    assert report.passes[0]["rewrites"] == {"mlp": 0, "heads": 0}


@pytest.mark.parametrize("method", CRITERIA)
@pytest.mark.parametrize("allocation", ["uniform", "standardized", "outlier"])
def test_compiled_graph_equals_physically_pruned_model(method, allocation, tmp_path):
    """The rewritten graph computes exactly what the model with its Linear modules sliced by the
    same plan computes (FLAP's bias included)."""
    model = tiny()
    prune = spec(method, mlp_ratio=0.3, head_ratio=1 / 3, allocation=allocation)
    if allocation == "outlier":
        prune["calibration"] = CALIB
    plan = plan_of(model, prune, tmp_path)
    logits = run(model, {"method": "plan", "plan": plan})
    reference = shrink_model(tiny(), plan)
    torch.testing.assert_close(logits, dense(reference), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(logits, dense(model), atol=1e-3)
    removed = [40 - len(m.keep) for m in plan.mlp]
    assert sum(removed) == 2 * (40 - round(40 * 0.7))
    assert all(len(h.keep_heads) == 4 and len(h.keep_kv_heads) == 2 for h in plan.heads)
    if allocation == "uniform":
        assert removed == [12, 12]
    assert (plan.mlp[0].bias is not None) == (method == "flap")


def test_uniform_shapes_and_explain_counts():
    model = tiny()
    gm_holder = {}

    def capture(gm, example_inputs):
        out, report = compile_sparse.backend.transform_graph(
            gm, example_inputs, compile_sparse.parse_options({"prune": spec("wanda", mlp_ratio=0.25, head_ratio=1 / 3)}))
        gm_holder["gm"], gm_holder["report"] = out, report
        return out.forward

    torch.compile(model, backend=capture)(ids(), use_cache=False)
    gm, report = gm_holder["gm"], gm_holder["report"]
    analysis = compile_sparse.analyze(gm, [])
    assert [s.intermediate_size for s in analysis.mlp] == [30, 30]
    assert [(s.num_heads, s.num_kv_heads) for s in analysis.attention] == [(4, 2), (4, 2)]
    result = report.passes[0]
    assert result["rewrites"] == {"mlp": 2, "heads": 2}
    assert result["sites"]["layer 0 mlp"] == "kept 30 of 40 neurons"
    assert result["sites"]["layer 1 attention"] == "kept 4 of 6 query heads, 2 of 2 KV heads"
    hidden = 48
    removed_mlp = 2 * 10 * 3 * hidden  # gate row, up row, down column per neuron
    removed_heads = 2 * 2 * 8 * hidden * 2  # q rows and o columns per head
    assert result["params"]["before"] - result["params"]["after"] == removed_mlp + removed_heads
    text = str(compile_sparse.explain(model, ids(), use_cache=False,
                                      options={"prune": spec("wanda", mlp_ratio=0.25, head_ratio=1 / 3)}))
    assert f"parameters pruned: {result['params']['before']:,} -> {result['params']['after']:,}" in text


def test_kv_group_units_remove_whole_groups(tmp_path):
    model = tiny(heads=6, kv_heads=3)
    plan = plan_of(model, spec("taylor", head_ratio=1 / 3, head_unit="kv_group"), tmp_path)
    for h in plan.heads:
        assert len(h.keep_kv_heads) == 2
        assert h.keep_heads == [q for kv in h.keep_kv_heads for q in (2 * kv, 2 * kv + 1)]
    torch.testing.assert_close(run(model, {"method": "plan", "plan": plan}), dense(shrink_model(tiny(heads=6, kv_heads=3), plan)),
                               atol=1e-6, rtol=1e-5)


def test_kv_group_pruning_with_a_kv_cache_is_refused():
    model = tiny(heads=6, kv_heads=3)
    compiled = torch.compile(model.forward, backend="sparse", options={
        "prune": spec("wanda", head_ratio=1 / 3, head_unit="kv_group"), "lowering": "eager"})
    with pytest.raises(Exception, match="removing KV heads from a graph that fills a KV cache"):
        with torch.no_grad():
            compiled(input_ids=ids(), use_cache=True)


def test_query_units_keep_equal_groups(tmp_path):
    model = tiny(heads=9, kv_heads=3)
    plan = plan_of(model, spec("wanda", head_ratio=1 / 3), tmp_path)
    for h in plan.heads:
        assert len(h.keep_heads) == 6
        assert [sum(1 for q in h.keep_heads if q // 3 == g) for g in range(3)] == [2, 2, 2]


# ---------------------------------------------------------------------------------------------
# Plans, export, decode, Inductor
# ---------------------------------------------------------------------------------------------


def test_saved_plan_needs_no_calibration(tmp_path, monkeypatch):
    model = tiny()
    first = run(model, spec("flap", mlp_ratio=0.25, head_ratio=1 / 3, save_plan=str(tmp_path / "plan.json")))
    torch.compiler.reset()

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration ran")

    monkeypatch.setattr(plan_build, "calibrate", no_calibration)
    again = run(model, {"method": "plan", "plan": str(tmp_path / "plan.json")})
    assert torch.equal(first, again)


@pytest.mark.parametrize("allocation", ["uniform", "outlier"])
def test_export_reloads_with_the_same_logits(allocation, tmp_path):
    model = tiny()
    prune = spec("flap", mlp_ratio=0.25, head_ratio=1 / 3, allocation=allocation, save_plan=str(tmp_path / "plan.json"))
    logits = run(model, prune)
    plan = compile_sparse.Plan.load(tmp_path / "plan.json")
    assert plan.is_uniform() == (allocation == "uniform")
    compile_sparse.export(model, plan, tmp_path / "ckpt")
    reloaded, tokenizer = models.load(tmp_path / "ckpt")
    assert tokenizer is None
    torch.testing.assert_close(dense(reloaded), logits, atol=1e-6, rtol=1e-5)
    assert sum(p.numel() for p in reloaded.parameters()) < sum(p.numel() for p in model.parameters())
    if allocation == "uniform":
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
        assert plain.config.intermediate_size == 30 and plain.config.num_attention_heads == 4
        torch.testing.assert_close(dense(plain), logits, atol=1e-6, rtol=1e-5)


def test_generate_reuses_the_plan_in_decode(tmp_path):
    """Prefill and decode graphs prune the same way; decode has no token-id input of the
    calibration shape, so it must reuse the prefill's plan."""
    model = tiny()
    prune = spec("wanda", mlp_ratio=0.25, head_ratio=1 / 3, save_plan=str(tmp_path / "plan.json"))
    compiled = torch.compile(model.forward, backend="sparse", options={"prune": prune, "lowering": "eager"})
    eager_forward = model.forward
    model.forward = compiled
    try:
        out, logits = generate(model, ids(), steps=6)
    finally:
        model.forward = eager_forward
    reference = shrink_model(tiny(), compile_sparse.Plan.load(tmp_path / "plan.json"))
    expected, expected_logits = generate(reference, ids(), steps=6)
    assert torch.equal(out, expected)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)


def test_inductor_lowering_matches_eager_lowering():
    model = tiny()
    prune = spec("flap", mlp_ratio=0.25, head_ratio=1 / 3)
    eager = run(model, prune)
    torch.compiler.reset()
    torch.testing.assert_close(run(model, prune, lowering="inductor"), eager, atol=1e-5, rtol=1e-5)


def test_prune_then_kv_eviction_composes():
    model = tiny()
    options = {"prune": spec("wanda", head_ratio=1 / 3, mlp_ratio=0.25),
               "kv": {"method": "snapkv", "compression_ratio": 0.5, "window_size": 4}, "lowering": "eager"}
    compiled = torch.compile(model.forward, backend="sparse", options=options)
    with torch.no_grad():
        cache = compiled(input_ids=ids(), use_cache=True).past_key_values
    assert [tuple(layer.keys.shape) for layer in cache.layers] == [(1, 2, 8, 8)] * 2


# ---------------------------------------------------------------------------------------------
# Other graph forms: explicit head sizes, Conv1D MLPs, fused qkv
# ---------------------------------------------------------------------------------------------


class ExplicitHeads(nn.Module):
    """Attention written with explicit head counts in every view (as many hand-written models do)."""

    def __init__(self, dim=32, heads=4, layers=2, vocab=64):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "q": nn.Linear(dim, dim), "k": nn.Linear(dim, dim), "v": nn.Linear(dim, dim), "o": nn.Linear(dim, dim),
            "up": nn.Linear(dim, 3 * dim), "down": nn.Linear(3 * dim, dim)}) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx):
        x = self.emb(idx)
        B, T, C = x.shape
        for b in self.blocks:
            q = b["q"](x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
            k = b["k"](x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
            v = b["v"](x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
            x = x + b["o"](y.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))  # (B, T, C)
            x = x + b["down"](F.gelu(b["up"](x)))
        return self.head(x)


def test_explicit_head_sizes_are_rewritten(tmp_path):
    torch.manual_seed(0)
    model = ExplicitHeads().eval()
    x = torch.randint(0, 64, (2, 12))
    report = {}

    def capture(gm, example_inputs):
        options = compile_sparse.parse_options({"prune": {"method": "magnitude", "head_ratio": 0.5, "mlp_ratio": 0.5,
                                                          "save_plan": str(tmp_path / "plan.json")}})
        out, report["r"] = compile_sparse.backend.transform_graph(gm, example_inputs, options)
        report["code"] = out.code
        return out.forward

    with torch.no_grad():
        logits = torch.compile(model, backend=capture)(x)
    assert report["r"].passes[0]["rewrites"] == {"mlp": 2, "heads": 2}
    assert "(2, 12, 2, 8)" in report["code"] and "(2, 12, 16)" in report["code"]
    # reference: the same heads and neurons removed by hand
    plan = compile_sparse.Plan.load(tmp_path / "plan.json")
    ref = ExplicitHeads().eval()
    ref.load_state_dict(model.state_dict())
    shrink_model(ref, plan)
    ref.heads = 2
    with torch.no_grad():
        torch.testing.assert_close(logits, ref(x), atol=1e-6, rtol=1e-5)


def test_gpt2_conv1d_mlp_is_pruned_like_sliced_weights(tmp_path):
    model = models.tiny_gpt2()
    x = ids(length=12)
    plan = plan_of(model, {"method": "wanda", "mlp_ratio": 0.5, "calibration": [ids(s, length=12) for s in (1, 2)]},
                   tmp_path, input_ids=x)
    logits = run(model, {"method": "plan", "plan": plan}, input_ids=x)
    assert [len(m.keep) for m in plan.mlp] == [128, 128]
    ref = models.tiny_gpt2()
    for block, entry in zip(ref.transformer.h, plan.mlp):
        keep = torch.tensor(entry.keep)
        with torch.no_grad():  # Conv1D stores (in, out)
            block.mlp.c_fc.weight = nn.Parameter(block.mlp.c_fc.weight[:, keep])
            block.mlp.c_fc.bias = nn.Parameter(block.mlp.c_fc.bias[keep])
            block.mlp.c_fc.nf = len(keep)
            block.mlp.c_proj.weight = nn.Parameter(block.mlp.c_proj.weight[keep, :])
    torch.testing.assert_close(logits, dense(ref, x), atol=1e-5, rtol=1e-5)


def test_fused_qkv_heads_are_refused_with_the_reason():
    model = models.nanogpt()
    report = compile_sparse.explain(model, torch.randint(0, 128, (1, 8)),
                                    options={"prune": {"method": "magnitude", "head_ratio": 0.5, "mlp_ratio": 0.5}})
    result = report.passes[0]
    assert result["rewrites"] == {"mlp": 2, "heads": 0}
    assert "fused projection" in result["sites"]["layer 0 attention"]


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("params, message", [
    ({"method": "wanda", "mlp_ratio": 0.2}, "needs calibration batches"),
    ({"method": "magnitude", "mlp_ratio": 1.0}, "mlp_ratio must be a number in [0, 1), got 1.0"),
    ({"method": "magnitude", "head_ratio": -0.1}, "head_ratio must be a number in [0, 1), got -0.1"),
    ({"method": "magnitude", "head_unit": "heads"}, "head_unit must be one of query, kv_group, got 'heads'"),
    ({"method": "magnitude", "allocation": "global"}, "allocation must be one of uniform, standardized, outlier"),
    ({"method": "magnitude", "allocation": "outlier"}, "outlier allocation"),
    ({"method": "nm", "n": 5, "m": 4, "criterion": "magnitude"}, "n must be at most m, got n=5, m=4"),
    ({"method": "nm"}, "criterion 'wanda' needs calibration batches"),
    ({"method": "plan", "plan": "/nonexistent/plan.json"}, "no plan file at /nonexistent/plan.json"),
    ({"method": "magnitude", "sparsity": 0.5}, "valid parameters: mlp_ratio, head_ratio"),
])
def test_bad_options_are_refused(params, message):
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        compile_sparse.parse_options({"prune": params})
    assert message in str(err.value)


def test_calibration_batches_must_match_the_compiled_shape():
    model = tiny()
    with pytest.raises(Exception, match=r"shaped like the compiled input \(1, 16\); got \(1, 8\)"):
        run(model, {"method": "wanda", "mlp_ratio": 0.25, "calibration": [ids(length=8)]})


def test_gradient_criteria_need_full_logits():
    model = tiny()
    compiled = torch.compile(model, backend="sparse",
                             options={"prune": spec("taylor", mlp_ratio=0.25), "lowering": "eager"})
    with pytest.raises(Exception, match="returns no logits for every position"):
        with torch.no_grad():
            compiled(ids(), use_cache=False, logits_to_keep=1)


def test_plan_for_another_model_is_refused(tmp_path):
    plan = plan_of(tiny(), spec("magnitude", mlp_ratio=0.25), tmp_path)
    torch.compiler.reset()
    with pytest.raises(Exception, match="width 40, the graph's 64"):
        run(tiny(intermediate=64), {"method": "plan", "plan": plan})


@pytest.mark.slow
def test_smollm2_uniform_mlp_widths_and_export(tmp_path):
    """Acceptance shapes on the real model: every MLP keeps round(1536 x 0.6) = 922 neurons, and
    the exported checkpoint reloads (plain transformers) with the compiled model's logits."""
    model, tokenizer = models.load("smollm2")
    x = tokenizer(models.pydoc_text()[:4000], return_tensors="pt").input_ids[:, :64]
    prune = {"method": "magnitude", "mlp_ratio": 0.4, "save_plan": str(tmp_path / "plan.json")}
    logits = run(model, prune, input_ids=x)
    plan = compile_sparse.Plan.load(tmp_path / "plan.json")
    assert [len(m.keep) for m in plan.mlp] == [round(1536 * 0.6)] * 30 == [922] * 30
    compile_sparse.export(model, plan, tmp_path / "ckpt", tokenizer=tokenizer)
    reloaded, reloaded_tokenizer = models.load(tmp_path / "ckpt")
    assert reloaded.config.intermediate_size == 922 and reloaded_tokenizer is not None
    torch.testing.assert_close(dense(reloaded, x), logits, atol=1e-4, rtol=1e-4)
    assert math.isclose(sum(p.numel() for p in reloaded.parameters()),
                        sum(p.numel() for p in model.parameters()) - 30 * 614 * 3 * 576)


def test_fused_gate_up_is_pruned_in_both_halves_and_exported(tmp_path):
    """Phi-3's gate_up_proj (one Linear, split by chunk): the kept neurons' rows of both halves are
    kept, the plan records the halves' offsets, and the exported checkpoint loads in plain
    transformers with the compiled pruned model's logits."""
    from transformers import AutoModelForCausalLM

    from .architectures import build, inputs

    model, ids = build("phi3"), inputs("phi3")["input_ids"]
    plan_file = tmp_path / "plan.json"
    options = {"prune": {"method": "magnitude", "mlp_ratio": 0.5, "save_plan": str(plan_file)}, "lowering": "eager"}
    with torch.no_grad():
        pruned = torch.compile(model, backend="sparse", options=options)(ids, use_cache=False).logits
    plan = compile_sparse.Plan.load(plan_file)
    assert [(m.width, len(m.keep), m.offsets) for m in plan.mlp] == [(128, 64, {"gate": 0, "up": 128})] * 2
    rows = plan.mlp[0].producer_rows()[plan.mlp[0].weights["up"]]
    assert rows.tolist() == plan.mlp[0].keep + [k + 128 for k in plan.mlp[0].keep]
    for layer, entry in zip(model.model.layers, plan.mlp):  # magnitude: gate row, up row and down column
        gate_up, down = layer.mlp.gate_up_proj.weight.double(), layer.mlp.down_proj.weight.double()
        norms = (gate_up[:128] ** 2).sum(1) + (gate_up[128:] ** 2).sum(1) + (down ** 2).sum(0)
        assert entry.keep == norms.topk(64).indices.sort().values.tolist()
    compile_sparse.export(model, plan, tmp_path / "out")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert exported.model.layers[0].mlp.gate_up_proj.weight.shape == (128, 64)
    with torch.no_grad():
        torch.testing.assert_close(exported(ids, use_cache=False).logits, pruned, atol=1e-5, rtol=1e-4)
