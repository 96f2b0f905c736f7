"""Plans are validated when loaded: a plan edited or corrupted by hand fails with a ValueError that
names the layer and the field, not deep inside the graph with torch's words."""

import copy
import json

import pytest

import compile_sparse
from compile_sparse.plan import FORMAT, Plan

MLP = {"layer": 1, "width": 8, "keep": [0, 2, 5], "weights": {"gate": "g", "up": "u", "down": "d"}, "bias": None}
HEADS = {"layer": 0, "num_heads": 6, "num_kv_heads": 2, "head_dim": 4, "keep_heads": [0, 1, 3, 4], "keep_kv_heads": [0, 1],
         "weights": {"q": "q", "k": "k", "v": "v", "o": "o"}, "bias": None}
GOOD = {"format": FORMAT, "method": "wanda", "mlp": [MLP], "heads": [HEADS]}


def edited(path, value):
    """GOOD with the field at ``path`` (a tuple of keys / indices) set to ``value`` (or removed: ...)."""
    data = copy.deepcopy(GOOD)
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is ...:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


def test_a_good_plan_round_trips(tmp_path):
    plan = Plan.from_dict(GOOD)
    assert Plan.load(plan.save(tmp_path / "plan.json")).to_dict() == GOOD


@pytest.mark.parametrize("path, value, message", [
    (("mlp", 0, "keep"), [0, 2, 2], "plan layer 1 MLP: keep must be sorted without duplicates"),
    (("mlp", 0, "keep"), [5, 2], "plan layer 1 MLP: keep must be sorted without duplicates"),
    (("mlp", 0, "keep"), [], "plan layer 1 MLP: keep is empty: every layer keeps at least one unit"),
    (("mlp", 0, "keep"), [0, 8], r"plan layer 1 MLP: keep must lie in \[0, 8\), got 0 .. 8"),
    (("mlp", 0, "keep"), ["0", "2"], "plan layer 1 MLP: keep must be a list of ints"),
    (("mlp", 0, "keep"), ..., r"plan MLP entry \(layer 1\): missing field\(s\) keep"),
    (("mlp", 0, "size"), 3, r"plan MLP entry \(layer 1\): unknown field\(s\) size"),
    (("mlp", 0, "width"), 0, "plan layer 1 MLP: width must be an int >= 1, got 0"),
    (("mlp", 0, "weights"), {"up": "u", "down": "d"}, "plan layer 1 MLP: weights must name gate, up, down"),
    (("mlp", 0, "bias"), "x", "plan layer 1 MLP: bias must be null or a non-empty list of numbers"),
    (("heads", 0, "keep_heads"), [0, 1, 6], r"plan layer 0 attention: keep_heads must lie in \[0, 6\)"),
    (("heads", 0, "keep_kv_heads"), [0], "plan layer 0 attention: keep_kv_heads .* must be the KV heads of keep_heads"),
    (("heads", 0, "keep_heads"), [0, 1, 3], "each keeping the same number of query heads"),
    (("heads", 0, "num_kv_heads"), 4, "plan layer 0 attention: 6 query heads cannot share 4 KV heads"),
    (("heads",), "all", "plan: 'mlp' and 'heads' must be lists"),
    (("method",), ..., "plan: missing field 'method'"),
    (("format",), "plan/0", "not a compile_sparse plan: format 'plan/0'"),
])
def test_a_corrupted_plan_names_the_layer_and_the_field(path, value, message):
    with pytest.raises(ValueError, match=message):
        Plan.from_dict(edited(path, value))


def test_biases_of_one_kind_have_one_length(tmp_path):
    data = edited(("mlp", 0, "bias"), [0.5] * 4)
    data["mlp"].append({**MLP, "layer": 2, "bias": [0.5] * 3})
    with pytest.raises(ValueError, match=r"the MLP compensation biases have different lengths \[3, 4\]"):
        Plan.from_dict(data)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="different lengths"):
        compile_sparse.parse_options({"prune": {"method": "plan", "plan": str(path)}})


def test_a_bias_of_the_wrong_length_is_refused_when_applied(tmp_path):
    import torch

    from compile_sparse import models

    model = models.tiny_llama()
    ids = torch.randint(0, 128, (1, 8))
    path = tmp_path / "plan.json"
    options = {"prune": {"method": "flap", "mlp_ratio": 0.25, "calibration": [ids], "save_plan": str(path)}}
    compile_sparse.explain(model, input_ids=ids, use_cache=False, options=options)
    data = json.loads(path.read_text())
    for entry in data["mlp"]:
        entry["bias"] = entry["bias"][:-1]  # one value short of the hidden size (64)
    path.write_text(json.dumps(data))
    with pytest.raises(compile_sparse.PassError, match="down_proj.weight: the plan.s compensation bias has 63 values, the projection 64 outputs"):
        compile_sparse.explain(model, input_ids=ids, use_cache=False,
                               options={"prune": {"method": "plan", "plan": str(path)}})
