"""The report a person reads: identical consecutive layers grouped into one row, any difference
breaking the group, every row with --per-layer and in to_dict()."""

import torch

import compile_sparse
from compile_sparse import models
from compile_sparse.cli import main
from compile_sparse.report import format_sites


def test_identical_layers_share_a_row_and_per_layer_keeps_every_row():
    report = compile_sparse.explain(models.tiny_llama(layers=4), input_ids=torch.randint(0, 128, (1, 40)),
                                    use_cache=True, options={"kv": {"method": "h2o", "compression_ratio": 0.75}})
    grouped, full = str(report), report.format(per_layer=True)
    assert "    0-3  sdpa" in grouped and "    0-3  gated" in grouped
    assert "  layers 0-3 attention: prefill eviction: cache 40 -> 10 tokens" in grouped
    assert all(f"      {layer}  sdpa" in full for layer in range(4))
    assert all(f"  layer {layer} attention: prefill eviction: cache 40 -> 10 tokens" in full for layer in range(4))
    assert len(report.to_dict()["attention_sites"]) == 4 and len(report.to_dict()["passes"][0]["sites"]) == 4


def test_a_differing_layer_breaks_the_group():
    sites = {f"layer {i} attention": ("cache 40 -> 30 tokens" if i == 2 else "cache 40 -> 10 tokens") for i in range(5)}
    assert format_sites(sites) == ["  layers 0-1 attention: cache 40 -> 10 tokens",
                                   "  layer 2 attention: cache 40 -> 30 tokens",
                                   "  layers 3-4 attention: cache 40 -> 10 tokens"]
    sites["graph"] = "note"
    assert format_sites(sites)[-1] == "  graph: note"


def test_inspect_groups_by_default_and_prints_every_layer_on_request(capsys):
    assert main(["inspect", "tiny-llama", "--seq-len", "8"]) == 0
    grouped = capsys.readouterr().out
    assert main(["inspect", "tiny-llama", "--seq-len", "8", "--per-layer"]) == 0
    full = capsys.readouterr().out
    assert "    0-1  sdpa" in grouped and "      0  sdpa" in full and "      1  sdpa" in full
