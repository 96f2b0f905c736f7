"""compile-sparse inspect, eval and bench."""

import json

import pytest

from compile_sparse.cli import main
from compile_sparse.passes.registry import METHODS


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
    assert data["options"]["recipe"] == "kv-balanced"  # no options: the default recipe


def test_inspect_bad_options_exit_2_with_the_valid_keys(capsys):
    assert main(["inspect", "tiny-llama", "--options", '{"kv": "nope"}']) == 2
    listed = capsys.readouterr().err.split("available kv methods: ")[1].strip().split(", ")
    assert listed == sorted(METHODS["kv"])  # every registered name
    assert main(["inspect", "tiny-llama", "--options", '{"prune2": 1}']) == 2
    assert "valid keys: prune, tokens, kv, recipe, lowering, kernels, strict, debug_dir" in capsys.readouterr().err


def test_inspect_unknown_model_names_the_zoo(capsys):
    assert main(["inspect", "gpt-5"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'gpt-5'; zoo: smollm2, minilm, tiny-llama" in err
    assert "or a local model folder, but " in err and "gpt-5 does not exist" in err


@pytest.fixture
def model_folder(tmp_path):
    """A random LlamaForCausalLM and a word-level tokenizer saved as transformers saves them."""
    from tokenizers import Tokenizer, models as tokenizer_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from compile_sparse.models import pydoc_text, tiny_llama

    words = sorted(set(pydoc_text().split()))[:500]
    backend = Tokenizer(tokenizer_models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}},
                                                   unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    folder = tmp_path / "my-model"
    tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=96, vocab=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_inspect_a_local_model_folder(model_folder, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["inspect", str(model_folder), "--seq-len", "8", "--json", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "1 graph(s), 2 attention sites, 2 MLP sites, 0 skipped" in printed
    assert "0-1  sdpa                      4/2       16   True      8      8" in printed  # grouped, sdpa, 8 tokens
    assert "layers 0-1 attention: prefill eviction: cache 8 -> 4 tokens" in printed
    assert json.loads(out.read_text())["model"] == str(model_folder)


@pytest.mark.parametrize("setup, missing", [
    (lambda folder: None, "does not exist"),
    (lambda folder: folder.mkdir(), "is not a model folder: it has no config.json"),
    (lambda folder: (folder.mkdir(), (folder / "config.json").write_text('{"model_type": "llama"}')),
     "transformers cannot load a model from it: Error no file named model.safetensors"),
    (lambda folder: (folder.mkdir(), (folder / "config.json").write_text("{nope")),
     "transformers cannot load a model from it: It looks like the config file"),
])
def test_a_folder_that_is_not_a_model_is_a_clear_error(tmp_path, capsys, setup, missing):
    folder = tmp_path / "not-a-model"
    setup(folder)
    assert main(["inspect", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("compile-sparse: error: ") and str(folder) in err and missing in err
    assert "Traceback" not in err


def test_eval_and_bench_refuse_a_model_of_the_wrong_kind(model_folder, capsys):
    assert main(["eval", str(model_folder), "--protocol", "minilm", "--method", "h2o"]) == 2
    assert (f"--protocol minilm needs a model of kind encoder; {model_folder} is of kind causal-lm "
            "(LlamaForCausalLM)") in capsys.readouterr().err
    assert main(["bench", "tiny-bert"]) == 2
    assert "bench (prefill and decode steps) needs a model of kind causal-lm; tiny-bert is of kind encoder" \
        in capsys.readouterr().err


def test_inspect_with_kv_eviction_shows_what_the_cache_keeps(capsys):
    options = '{"kv": {"method": "snapkv", "compression_ratio": 0.75, "window_size": 8}}'
    assert main(["inspect", "tiny-llama", "--options", options]) == 0
    out = capsys.readouterr().out
    assert "pass kv:snapkv: prefill eviction: 2" in out
    assert "layers 0-1 attention: prefill eviction: cache 32 -> 8 tokens" in out
    assert "KV cache handed back: 16.0 KiB -> 4.0 KiB (75% saved)" in out


def test_bench_times_dense_and_sparse_and_writes_the_json_fields(tmp_path, capsys):
    out = tmp_path / "bench.json"
    options = '{"kv": {"method": "streaming_llm", "compression_ratio": 0.5}, "lowering": "eager"}'
    argv = ["bench", "tiny-llama", "--context", "64", "--runs", "3", "--options", options, "--json", str(out)]
    assert main(argv + ["--compile-time"]) == 0
    data = json.loads(out.read_text())
    assert (data["model"], data["context"], data["batch"], data["rounds"]) == ("tiny-llama", 64, 1, 3)
    assert data["kv_bytes_sparse"] * 2 == data["kv_bytes_dense"]  # 32 of 64 tokens per layer, measured
    for phase, sides in (("prefill", ("dense", "sparse")), ("decode", ("dense", "ideal", "sparse"))):
        assert all(data[phase][f"{side}_ms"] > 0 and data[phase]["spread"][side] >= 0 for side in sides)
    rounds = data["decode"]["rounds_ms"]
    assert all(len(rounds[side]) == 3 for side in ("dense", "ideal", "sparse"))
    ratios = sorted(s / i for s, i in zip(rounds["sparse"], rounds["ideal"]))
    assert data["decode"]["vs_ideal"] == ratios[1]  # the median of the rounds' own ratios
    assert data["decode"]["ratio_spread"]["vs_ideal"] == (ratios[2] - ratios[0]) / ratios[1]
    for cache in ("cold", "warm"):
        assert all(data["compile_s"][cache][side][phase] > 0 for side in ("dense", "sparse")
                   for phase in ("prefill", "decode"))
    assert "decode step" in capsys.readouterr().out


def test_eval_minilm_prints_a_table_writes_json_and_plots(tmp_path, capsys):
    out, plot = tmp_path / "eval.json", tmp_path / "eval.png"
    settings = ['{"tokens": {"method": "tome", "layers": [4, 5], "keep_ratios": [0.85, 0.7]}}',
                '{"tokens": {"method": "evit", "layers": [5], "keep_ratios": [0.7]}}']
    argv = ["eval", "minilm", "--protocol", "minilm", "--sentences", "3", "--json", str(out), "--plot", str(plot)]
    assert main(argv + [x for s in settings for x in ("--options", s)]) == 0
    data = json.loads(out.read_text())
    assert data["protocol"] == "minilm" and len(data["settings"]) == 2
    assert data["command"].startswith("compile-sparse eval minilm") and data["seconds"] >= 0
    assert all(0 < s["mean_cosine"] < 1 and s["sentences"] == 3 for s in data["settings"])
    assert data["settings"][0]["tokens_removed"] == pytest.approx(1 - (4 + 0.85 + 0.7) / 6)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "tome(layers=[4, 5], keep_ratios=[0.85, 0.7])" in printed and "mean cosine" in printed


@pytest.mark.slow
def test_eval_ctx_continuation_on_smollm2_beside_truncate(tmp_path):
    out = tmp_path / "eval.json"
    assert main(["eval", "smollm2", "--protocol", "ctx-continuation", "--docs", "1", "--method", "h2o", "--ratios", "0.5",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    for key in ("model", "protocol", "options", "ppl", "ppl_dense", "ppl_ratio", "documents"):
        assert key in data
    assert data["kv_saved"] == pytest.approx(0.5) and data["cache_tokens"] == [512] * 30
    assert 1 < data["ppl_ratio"] < data["truncate_ppl_ratio"]


def test_eval_without_a_setting_is_an_error(capsys):
    assert main(["eval", "smollm2", "--protocol", "window-ppl"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_eval_settings_accept_a_criterion_eval_calibrates_and_refuse_a_bad_value(capsys):
    """FLAP needs calibration batches, which eval adds from the calibration speeches after loading
    the model: the early check of the settings (before the model loads) must not refuse it, but
    still refuses a bad ratio, naming it."""
    flap = {"prune": {"method": "flap", "mlp_ratio": 0.2}}
    bad = {"prune": {"method": "flap", "mlp_ratio": 1.5}}
    assert main(["eval", "smollm2", "--protocol", "window-ppl", "--options", json.dumps(flap),
                 "--options", json.dumps(bad)]) == 2
    error = capsys.readouterr().err
    assert "1.5" in error and "calibration" not in error
