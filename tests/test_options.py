"""Options: parsing, validation, recipes, and the errors a user sees."""

from dataclasses import dataclass

import pytest

import torch

from compile_sparse import RECIPES, parse_options
from compile_sparse import H2OConfig, SnapKVConfig, TOVAConfig
from compile_sparse.passes import FAMILIES, METHODS, register, register_pass, unregister
from compile_sparse.report import PassResult


ONES = torch.ones(1, 8, dtype=torch.long)


@dataclass
class KeepConfig:
    budget: int = 8

    def __post_init__(self):
        if self.budget < 1:
            raise ValueError(f"budget must be >= 1, got {self.budget}")


register_pass(KeepConfig)(lambda gm, analysis, config, ctx: PassResult("keep", "kv"))


@pytest.fixture
def keep_method():
    register("kv", "keep")(KeepConfig)
    yield
    unregister("kv", "keep")


def test_no_options_is_the_default_recipe():
    for empty in (None, {}, {"lowering": "inductor"}):
        parsed = parse_options(empty)
        assert parsed.recipe == "kv-balanced" and parsed.lowering == "inductor"
        assert parsed.methods["kv"] == TOVAConfig(compression_ratio=0.5, kernel_size=15, per_head=True)
    assert parse_options({"recipe": "dense"}).methods == {}
    assert parse_options({"kv": "snapkv"}).recipe is None


def test_recipe_parameters_merge_with_explicit_ones():
    parsed = parse_options({"recipe": "composed", "kv": {"compression_ratio": 0.6}, "prune": {"calibration": [ONES]}})
    assert parsed.methods["kv"] == H2OConfig(compression_ratio=0.6)
    assert parsed.methods["prune"].mlp_ratio == 0.2 and parsed.methods["tokens"].keep_ratios == (0.5,)
    assert isinstance(parse_options({"recipe": "kv-balanced", "kv": "snapkv"}).methods["kv"], SnapKVConfig)
    with pytest.raises(ValueError, match="needs calibration batches"):
        parse_options({"recipe": "prune-mlp20"})


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown option key\(s\) 'tokenz'; valid keys: prune, tokens, kv, recipe, "
                                         r"lowering, kernels, strict, debug_dir"):
        parse_options({"tokenz": "lazyllm"})


@pytest.mark.parametrize("family", FAMILIES)
def test_unknown_method_says_what_is_available(family):
    with pytest.raises(ValueError, match=f"unknown {family} method 'x'; available {family} methods: ") as err:
        parse_options({family: "x"})
    assert str(err.value).split("methods: ")[1].split(", ") == sorted(METHODS[family])  # every registered name


def test_a_config_error_names_its_family_and_method():
    with pytest.raises(ValueError, match="kv method 'h2o': recent_window must be an int >= 0, got -1"):
        parse_options({"kv": {"method": "h2o", "recent_window": -1}})
    with pytest.raises(ValueError, match="prune method 'flap': mlp_ratio must be a number in \\[0, 1\\), got 2"):
        parse_options({"prune": {"method": "flap", "mlp_ratio": 2, "calibration": [ONES]}})


def test_method_name_dict_and_config_object_are_the_same(keep_method):
    by_name = parse_options({"kv": "keep"}).methods["kv"]
    by_dict = parse_options({"kv": {"method": "keep", "budget": 8}}).methods["kv"]
    by_object = parse_options({"kv": KeepConfig(8)}).methods["kv"]
    assert by_name == by_dict == by_object == KeepConfig(8)
    assert parse_options({"kv": {"method": "keep", "budget": 4}}).to_dict()["kv"] == {"method": "keep", "budget": 4}


def test_unknown_parameter_lists_the_valid_ones(keep_method):
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) ratio for kv method 'keep'; valid parameters: budget"):
        parse_options({"kv": {"method": "keep", "ratio": 0.5}})


def test_missing_method_and_wrong_family(keep_method):
    with pytest.raises(ValueError, match="has no 'method'; available kv methods: dapq, defensivekv, expected_attention, h2o, hitkv, keep, keydiff, knorm"):
        parse_options({"kv": {"budget": 3}})
    with pytest.raises(ValueError, match=r"options\['prune'\] got a kv config \(KeepConfig\)"):
        parse_options({"prune": KeepConfig()})
    with pytest.raises(ValueError, match="must be a method name"):
        parse_options({"kv": 3})


def test_bad_values_are_shown(keep_method):
    with pytest.raises(ValueError, match="budget must be >= 1, got 0"):
        parse_options({"kv": {"method": "keep", "budget": 0}})
    with pytest.raises(ValueError, match="unknown lowering 'tvm'; valid: inductor, eager"):
        parse_options({"lowering": "tvm"})
    with pytest.raises(ValueError, match="unknown recipe 'fast'; recipes: composed, dense, kv-balanced, kv-continuation, kv-near-lossless, kv-retrieval, prune-mlp20"):
        parse_options({"recipe": "fast"})
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_options("{kv: }")
    with pytest.raises(ValueError, match="must be a dict, got list"):
        parse_options(["kv"])


def test_json_text_and_recipe_merge(keep_method, monkeypatch):
    monkeypatch.setitem(RECIPES, "small", {"kv": {"method": "keep", "budget": 2}, "lowering": "eager"})
    parsed = parse_options('{"recipe": "small", "lowering": "inductor"}')
    assert parsed.methods["kv"] == KeepConfig(2) and parsed.lowering == "inductor" and parsed.recipe == "small"


def test_registering_twice_is_refused(keep_method):
    with pytest.raises(ValueError, match="already registered"):
        register("kv", "keep")(KeepConfig)
    with pytest.raises(ValueError, match="unknown family 'weights'"):
        register("weights", "x")


def test_kernels_option_is_validated():
    assert parse_options({"kernels": "interpret"}).kernels == "interpret"
    assert parse_options(None).kernels == "auto"
    with pytest.raises(ValueError, match="unknown kernels 'cuda'; valid: auto, interpret"):
        parse_options({"kernels": "cuda"})
