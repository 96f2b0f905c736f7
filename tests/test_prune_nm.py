"""N:M semi-structured sparsity: exact N:M zeros per group, the weights each criterion keeps
against a reference, identity at n = m, and the calibration norms the backend keeps per model."""

import pytest
import torch
import torch.nn as nn

import compile_sparse
from compile_sparse.methods.nm import nm_mask

from .helpers import generate
from .test_prune import CALIB, dense, down_inputs, ids, run, tiny

# ---------------------------------------------------------------------------------------------
# N:M
# ---------------------------------------------------------------------------------------------


def test_nm_mask_keeps_the_top_n_of_every_group():
    score = torch.rand(6, 16)
    mask = nm_mask(score, 2, 4)
    groups = mask.view(6, 4, 4)
    assert groups.sum(-1).eq(2).all()
    chosen = score.view(6, 4, 4).topk(2, dim=-1).indices
    assert torch.equal(groups.gather(-1, chosen).all(-1), torch.ones(6, 4, dtype=torch.bool))


@pytest.mark.parametrize("criterion", ["wanda", "magnitude"])
def test_nm_sparsity(criterion):
    model = tiny()
    calib = {"calibration": CALIB} if criterion == "wanda" else {}
    assert torch.equal(run(model, {"method": "nm", "n": 4, "m": 4, "criterion": criterion, **calib}), dense(model))
    assert compile_sparse.explain(model, ids(), use_cache=False, options={"prune": {
        "method": "nm", "n": 4, "m": 4, "criterion": criterion, **calib}}).passes[0]["rewrites"] == {"linear": 0}
    torch.compiler.reset()
    weights = {}

    def capture(gm, example_inputs):
        options = compile_sparse.parse_options({"prune": {"method": "nm", "criterion": criterion, **calib}})
        out, report = compile_sparse.backend.transform_graph(gm, example_inputs, options)
        weights.update({name: buf for name, buf in out.named_buffers() if name.startswith("pruned_")})
        weights["report"] = report
        return out.forward

    with torch.no_grad():
        torch.compile(model, backend=capture)(ids(), use_cache=False)
    report = weights.pop("report")
    assert report.passes[0]["rewrites"] == {"linear": 14}  # 7 projections x 2 layers
    assert len(weights) == 14
    for w in weights.values():
        assert (w.reshape(w.shape[0], -1, 4) != 0).sum(-1).le(2).all()
    acts = down_inputs(model, CALIB)[0] if criterion == "wanda" else torch.ones(1, 40)
    down = model.model.layers[0].mlp.down_proj.weight
    expected = down * nm_mask(down.abs().double() * acts.norm(dim=0), 2, 4)
    name = next(n for n in weights if "layers_modules_0_modules_mlp_modules_down_proj" in n)
    assert torch.equal(weights[name], expected)


def test_nm_generate_matches_masked_weights():
    """Decode graphs reuse the prefill's calibration; tokens equal those of the eager model with
    every projection masked by Wanda 2:4 scores from hooks."""
    model = tiny()
    norms = {}

    def record(module, inp):
        x = inp[0].reshape(-1, inp[0].shape[-1]).double()
        norms[module] = norms.get(module, 0) + (x * x).sum(0)

    linears = [m for layer in model.model.layers for m in layer.modules() if isinstance(m, nn.Linear)]
    hooks = [m.register_forward_pre_hook(record) for m in linears]
    with torch.no_grad():
        for b in CALIB:
            model(b, use_cache=False)
    for h in hooks:
        h.remove()
    reference = tiny()
    with torch.no_grad():
        for mine, theirs in zip(linears, [m for layer in reference.model.layers for m in layer.modules()
                                          if isinstance(m, nn.Linear)]):
            theirs.weight.mul_(nm_mask(mine.weight.abs().double() * norms[mine].sqrt(), 2, 4))
    compiled = torch.compile(model.forward, backend="sparse",
                             options={"prune": {"method": "nm", "calibration": CALIB}, "lowering": "eager"})
    eager_forward, model.forward = model.forward, compiled
    try:
        out, logits = generate(model, ids(), steps=6)
    finally:
        model.forward = eager_forward
    expected, expected_logits = generate(reference, ids(), steps=6)
    assert torch.equal(out, expected)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
