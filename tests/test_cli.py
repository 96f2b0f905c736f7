"""compile-sparse inspect on the tiny zoo models."""

import json

from compile_sparse.cli import main


def test_inspect_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["inspect", "tiny-gpt2-eager", "--json", str(out), "--seq-len", "8"]) == 0
    printed = capsys.readouterr().out
    assert "2 attention sites, 2 MLP sites, 0 skipped" in printed
    assert "matmul_softmax qkv" in printed and "gelu_tanh" in printed
    data = json.loads(out.read_text())
    assert data["model"] == "tiny-gpt2-eager"
    assert len(data["attention_sites"]) == 2 and len(data["mlp_sites"]) == 2
    assert data["totals"]["kv_bytes_per_token"] == 2 * 2 * 4 * 16 * 4
    assert data["options"]["recipe"] == "dense"


def test_inspect_bad_options_exit_2_with_the_valid_keys(capsys):
    assert main(["inspect", "tiny-llama", "--options", '{"kv": "nope"}']) == 2
    assert "unknown kv method 'nope'; available kv methods: h2o, hitkv, knorm" in capsys.readouterr().err
    assert main(["inspect", "tiny-llama", "--options", '{"prune2": 1}']) == 2
    assert "valid keys: prune, tokens, kv, recipe, lowering, kernels, debug_dir" in capsys.readouterr().err


def test_inspect_unknown_model_names_the_zoo(capsys):
    try:
        main(["inspect", "gpt-5"])
    except SystemExit as exit:
        assert exit.code == 2
    assert "unknown model 'gpt-5'; zoo: smollm2, minilm, tiny-llama" in capsys.readouterr().err


def test_inspect_with_kv_eviction_shows_what_the_cache_keeps(capsys):
    options = '{"kv": {"method": "snapkv", "compression_ratio": 0.75, "window_size": 8}}'
    assert main(["inspect", "tiny-llama", "--options", options]) == 0
    out = capsys.readouterr().out
    assert "pass kv:snapkv: prefill eviction: 2" in out
    assert out.count("prefill eviction: cache 32 -> 8 tokens") == 2
    assert "KV cache handed back: 16.0 KiB -> 4.0 KiB (75% saved)" in out
