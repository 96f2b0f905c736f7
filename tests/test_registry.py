"""The registry: every method has a row in the test table, and a method is its file alone: a KV
method written here (a test-only one) is picked up by the generic checks, the CLI listing and
explain with nothing else changed."""

import json
from dataclasses import dataclass

import pytest
import torch

import compile_sparse
from compile_sparse import models
from compile_sparse.cli import main
from compile_sparse.passes.kv.scoring import KVConfig, ScoreInputs
from compile_sparse.passes.registry import METHODS, register, unregister

from .methods import EXAMPLES
from .test_kv_evict import T, expected_budget, ids, prefill_cache
from .helpers import compiled_generate_matches


@pytest.mark.parametrize("family", list(METHODS))
def test_every_registered_method_has_a_row_in_the_test_table(family):
    assert sorted(EXAMPLES[family]) == sorted(METHODS[family])


@dataclass
class NewestConfig(KVConfig):
    """Keeps the newest tokens: the score is the position (a method written in a test)."""

    def score(self, inputs: ScoreInputs) -> tuple[torch.Tensor, None]:
        b, hkv, length, _ = inputs.keys.shape
        return torch.arange(length, dtype=torch.float32).expand(b, hkv, length), None


@pytest.fixture
def newest():
    register("kv", "newest")(NewestConfig)
    EXAMPLES["kv"]["newest"] = {}
    yield
    unregister("kv", "newest")
    del EXAMPLES["kv"]["newest"]


def test_a_method_in_one_file_is_picked_up_everywhere(newest, capsys, tmp_path):
    model = models.tiny_llama()
    # the generic checks: identity at ratio 0, the exact budget, the tokens it says it keeps
    compiled_generate_matches(model, ids(), {"kv": {"method": "newest", "compression_ratio": 0.0}, "lowering": "eager"},
                              steps=4)
    with torch.no_grad():
        dense = model(input_ids=ids(), use_cache=True).past_key_values
    cache, _ = prefill_cache(model, ids(), {"kv": {"method": "newest", "compression_ratio": 0.5}, "lowering": "eager"})
    budget = expected_budget("newest", 0, 2, T, 0.5)
    for dense_layer, layer in zip(dense.layers, cache.layers):
        torch.testing.assert_close(layer.keys, dense_layer.keys[:, :, -budget:])
    # the CLI lists it
    assert main(["methods", "--json", str(tmp_path / "methods.json")]) == 0
    assert "newest" in capsys.readouterr().out
    assert json.loads((tmp_path / "methods.json").read_text())["kv"]["newest"]["config"] == "NewestConfig"
    # explain runs its pass
    report = compile_sparse.explain(model, input_ids=ids(), use_cache=True,
                                    options={"kv": {"method": "newest", "compression_ratio": 0.5}})
    assert report.passes[0]["method"] == "newest" and report.passes[0]["rewrites"] == {"prefill eviction": 2}
