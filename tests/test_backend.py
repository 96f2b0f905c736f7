"""backend="sparse" gives the eager model's outputs, with no graph break, on every tiny zoo model."""

import json
import logging
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

import compile_sparse
from compile_sparse import models
from compile_sparse.passes import register, register_pass, unregister
from compile_sparse.report import PassResult

from .helpers import compiled_generate_matches

FORWARD_MODELS = ["tiny-llama", "tiny-gpt2", "tiny-gpt2-eager", "tiny-bert", "tiny-vit", "nanogpt"]
LMS = ["tiny-llama", "tiny-gpt2", "tiny-gpt2-eager"]


def _first_output(out):
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("name", FORWARD_MODELS)
def test_forward_equals_eager_without_graph_break(name):
    model, tok = models.load(name)
    inputs = models.sample_inputs(name, model, tok, seq_len=12, batch=2)
    with torch.no_grad():
        ref = _first_output(model(**inputs))
        compiled = torch.compile(model, backend="sparse", fullgraph=True)  # fullgraph: a break is an error
        out = _first_output(compiled(**inputs))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1.3e-6)


@pytest.mark.parametrize("name", LMS)
def test_generate_prefill_and_8_decode_steps_equal_eager(name):
    model, _ = models.load(name)
    compiled_generate_matches(model, torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1)),
                              options={"recipe": "dense"})


def test_generate_with_static_cache_equals_eager():
    compiled_generate_matches(models.tiny_llama(), torch.randint(0, 128, (1, 10)), options={"recipe": "dense"},
                              cache_implementation="static")


def test_eager_lowering_equals_eager():
    compiled_generate_matches(models.tiny_llama(), torch.randint(0, 128, (1, 10)), options={"recipe": "dense", "lowering": "eager"})


def test_backend_is_found_in_a_fresh_process_without_importing_the_package():
    code = """
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1)
model = LlamaForCausalLM(config).eval()
ids = torch.randint(0, 64, (1, 6))
with torch.no_grad():
    ref = model(ids).logits
    assert "compile_sparse" not in sys.modules
    out = torch.compile(model, backend="sparse", options={"recipe": "dense", "lowering": "eager"})(ids).logits
assert "compile_sparse.backend" in sys.modules
torch.testing.assert_close(out, ref, atol=0, rtol=0)
print("OK")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("OK")


def test_bad_options_raise_from_torch_compile():
    model = models.tiny_llama()
    ids = torch.randint(0, 128, (1, 6))
    with pytest.raises(Exception, match="unknown option key.*'kvv'.*valid keys: prune, tokens, kv"):
        torch.compile(model, backend="sparse", options={"kvv": "snapkv"})(ids)


def test_mode_is_passed_to_inductor_and_checked():
    model = models.tiny_llama(layers=1)
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        ref = model(ids).logits
        out = torch.compile(model, backend="sparse", mode="default")(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1.3e-6)
    gm = torch.fx.symbolic_trace(lambda x: x + 1)
    with pytest.raises(ValueError, match="unknown mode 'fastest'"):
        compile_sparse.sparse_backend(gm, [torch.ones(2)], mode="fastest")


def test_debug_dir_dumps_every_step(tmp_path):
    model = models.tiny_llama(layers=1)
    with torch.no_grad():
        torch.compile(model, backend="sparse", options={"recipe": "dense", "debug_dir": str(tmp_path), "lowering": "eager"})(
            torch.randint(0, 128, (1, 6)))
    graph_dir = tmp_path / "graph_000"
    names = sorted(p.name for p in graph_dir.iterdir())
    assert names == ["00_captured.py", "01_final.py", "analysis.json", "analysis.txt"]
    assert "scaled_dot_product_attention" in (graph_dir / "00_captured.py").read_text()
    assert len(json.loads((graph_dir / "analysis.json").read_text())["attention_sites"]) == 1


def test_logging_goes_to_the_compile_sparse_logger(caplog):
    with caplog.at_level(logging.INFO, logger="compile_sparse"):
        compile_sparse.explain(models.tiny_llama(layers=1), input_ids=torch.randint(0, 128, (1, 6)))
    assert any(r.name == "compile_sparse" and "1 attention sites" in r.getMessage() for r in caplog.records)


# --- the pass manager, with a toy pass registered by the test --------------------------------


@dataclass
class ScaleOutputConfig:
    factor: float = 1.0

    def __post_init__(self):
        if self.factor <= 0:
            raise ValueError(f"factor must be > 0, got {self.factor}")


def _scale_attention_output(gm, analysis, config, ctx):
    """Multiply every attention output by ``factor`` (a toy rewrite, counted per site)."""
    result = PassResult("scale_output", "tokens")
    for site in analysis.attention:
        with gm.graph.inserting_after(site.node):
            scaled = gm.graph.call_function(torch.mul, (site.node, config.factor))
        site.node.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
        result.rewrites["scaled"] = result.rewrites.get("scaled", 0) + 1
        result.sites[f"layer {site.layer} attention"] = f"output x {config.factor}"
    return result


def _fail(gm, analysis, config, ctx):
    raise RuntimeError("boom")


@pytest.fixture
def toy_passes():
    register("tokens", "scale_output")(ScaleOutputConfig)
    register_pass(ScaleOutputConfig)(_scale_attention_output)

    @dataclass
    class FailConfig:
        pass

    register("kv", "fail")(FailConfig)
    register_pass(FailConfig)(_fail)
    yield
    unregister("tokens", "scale_output")
    unregister("kv", "fail")


def test_pass_manager_runs_passes_counts_rewrites_and_dumps(toy_passes, tmp_path):
    model = models.tiny_llama(layers=2)
    ids = torch.randint(0, 128, (1, 6))
    report = compile_sparse.explain(model, input_ids=ids, options={"tokens": {"method": "scale_output", "factor": 1.0}})
    assert report.passes == [{"method": "scale_output", "family": "tokens", "rewrites": {"scaled": 2},
                              "sites": {"layer 0 attention": "output x 1.0", "layer 1 attention": "output x 1.0"},
                              "kv_cache_bytes": {}, "params": {}, "refused": {}}]
    assert "pass tokens:scale_output: scaled: 2" in str(report)
    with torch.no_grad():
        ref = model(ids).logits
        out = torch.compile(model, backend="sparse", options={
            "tokens": ScaleOutputConfig(factor=1.0), "debug_dir": str(tmp_path)})(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1.3e-6)
    names = sorted(p.name for p in (tmp_path / "graph_000").iterdir())
    assert "01_after_tokens_scale_output.py" in names and "02_final.py" in names
    assert "torch.mul" in (tmp_path / "graph_000" / "01_after_tokens_scale_output.py").read_text()


def test_a_failing_pass_is_named_with_the_passes_before_it(toy_passes):
    model = models.tiny_llama(layers=1)
    with pytest.raises(compile_sparse.PassError, match=r"kv pass 'fail' failed \(passes run before it: "
                                                    r"tokens:scale_output\): RuntimeError: boom"):
        compile_sparse.explain(model, input_ids=torch.randint(0, 128, (1, 6)),
                               options={"kv": "fail", "tokens": "scale_output"})


def test_config_validation_shows_the_bad_value(toy_passes):
    with pytest.raises(ValueError, match="factor must be > 0, got -2"):
        compile_sparse.parse_options({"tokens": {"method": "scale_output", "factor": -2}})


def test_decode_over_a_growing_cache_compiles_twice_not_per_length():
    """The analysis reads symbolic sizes without guarding on them, so a growing cache recompiles
    once (to dynamic shapes), as Dynamo's own backends do, not once per length."""
    model = models.tiny_llama(layers=2)
    ids = torch.randint(0, 128, (1, 20))
    backends = []

    def counting(gm, example_inputs):
        backends.append(gm)
        return compile_sparse.sparse_backend(gm, example_inputs, options={"recipe": "dense", "lowering": "eager"})

    forward = torch.compile(model.forward, backend=counting)
    with torch.no_grad():
        cache = forward(input_ids=ids, use_cache=True).past_key_values
        for step in range(10):
            forward(input_ids=ids[:, :1], past_key_values=cache, position_ids=torch.tensor([[20 + step]]), use_cache=True)
    assert len(backends) == 3  # the prefill, the first decode step, then one graph with a symbolic length


def test_no_options_evicts_the_kv_cache_with_the_default_recipe():
    """backend="sparse" with no options (or options that choose no method) applies the default
    recipe: TOVA per KV head, pooled, keeping half of the prompt's cache (docs/results.md, "Recipes")."""
    model = models.tiny_llama(layers=2)
    ids = torch.randint(0, 128, (1, 40))
    for options in (None, {"lowering": "eager"}):
        torch.compiler.reset()
        kwargs = {} if options is None else {"options": options}
        with torch.no_grad():
            cache = torch.compile(model, backend="sparse", **kwargs)(ids, use_cache=True).past_key_values
        assert [layer.keys.shape[2] for layer in cache.layers] == [20, 20]
    report = compile_sparse.explain(model, ids, use_cache=True)
    assert report.options["recipe"] == "kv-balanced" and report.passes[0]["method"] == "tova"
    assert "recipe kv-balanced" in str(report)
