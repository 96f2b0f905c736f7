"""What each structured criterion keeps: the neurons and heads its plan keeps against references
computed from the eager model with hooks and autograd (a selection flipped to keep the weakest
units fails here), FLAP's compensation bias, and the allocation of removals across layers."""

import pytest
import torch
import torch.nn.functional as F

from compile_sparse.passes.prune.allocate import allocate, round_to_total

from .test_prune import CALIB, CRITERIA, down_inputs, plan_of, spec, tiny


def _reference_scores(model, method):
    layers = model.model.layers
    if method == "magnitude":
        return [(l.mlp.gate_proj.weight.double().pow(2).sum(1) + l.mlp.up_proj.weight.double().pow(2).sum(1)
                 + l.mlp.down_proj.weight.double().pow(2).sum(0)).sqrt() for l in layers]
    acts = down_inputs(model, CALIB)
    if method == "wanda":
        return [(l.mlp.down_proj.weight.double().abs() * acts[i].norm(dim=0)).sum(0) for i, l in enumerate(layers)]
    if method == "flap":
        return [acts[i].var(dim=0) * l.mlp.down_proj.weight.double().pow(2).sum(0) for i, l in enumerate(layers)]
    # taylor: |w * dL/dw| summed over each neuron's gate / up rows and down column
    model.zero_grad()
    for b in CALIB:
        logits = model(b, use_cache=False).logits
        F.cross_entropy(logits[0, :-1], b[0, 1:]).backward()
    scores = []
    for l in layers:
        g, u, d = l.mlp.gate_proj.weight, l.mlp.up_proj.weight, l.mlp.down_proj.weight
        scores.append((g * g.grad).double().abs().sum(1) + (u * u.grad).double().abs().sum(1)
                      + (d * d.grad).double().abs().sum(0))
    model.zero_grad()
    return scores


@pytest.mark.parametrize("method", ["magnitude", "wanda", "flap", "taylor"])
def test_kept_neurons_match_reference(method, tmp_path):
    model = tiny()
    plan = plan_of(model, spec(method, mlp_ratio=0.25), tmp_path)
    for entry, score in zip(plan.mlp, _reference_scores(model, method)):
        assert entry.keep == sorted(score.topk(30).indices.tolist())
    assert all(p.grad is None for p in model.parameters())  # calibration never touches the model's grads


def test_d2prune_scores_match_reference(tmp_path):
    """1/2 sum g^2 (a^2 + var a) per down-projection input channel, from autograd."""
    model = tiny()
    plan = plan_of(model, spec("d2prune", mlp_ratio=0.25), tmp_path)
    sums = {}
    acts = down_inputs(model, CALIB)

    def hook(module, inp, i):
        inp[0].register_hook(lambda g: sums.setdefault(i, []).append((inp[0].detach(), g)))

    hooks = [l.mlp.down_proj.register_forward_pre_hook(lambda m, inp, i=i: hook(m, inp, i))
             for i, l in enumerate(model.model.layers)]
    for b in CALIB:
        logits = model(b, use_cache=False).logits
        F.cross_entropy(logits[0, :-1], b[0, 1:]).backward()
    for h in hooks:
        h.remove()
    model.zero_grad()
    for i, entry in enumerate(plan.mlp):
        a = torch.cat([x.reshape(-1, 40) for x, _ in sums[i]]).double()
        g = torch.cat([y.reshape(-1, 40) for _, y in sums[i]]).double()
        score = 0.5 * ((g * g * a * a).sum(0) + (g * g).sum(0) * acts[i].var(dim=0))
        assert entry.keep == sorted(score.topk(30).indices.tolist())


def test_flap_bias_is_the_mean_of_removed_channels(tmp_path):
    model = tiny()
    plan = plan_of(model, spec("flap", mlp_ratio=0.25), tmp_path)
    acts = down_inputs(model, CALIB)
    for i, entry in enumerate(plan.mlp):
        removed = sorted(set(range(40)) - set(entry.keep))
        w = model.model.layers[i].mlp.down_proj.weight.double()
        expected = w[:, removed] @ acts[i].mean(0)[removed]
        torch.testing.assert_close(torch.tensor(entry.bias, dtype=torch.float64), expected)


def _o_inputs(model, batches, grads=False):
    """Per layer, the o projection's input (the attention output, (tokens, H * hd)) over the
    calibration tokens, and with ``grads`` dL/d(that input) from one backward per batch."""
    acts = {i: [] for i in range(len(model.model.layers))}
    grad = {i: [] for i in range(len(model.model.layers))}

    def hook(module, inp, i):
        acts[i].append(inp[0].detach().reshape(-1, inp[0].shape[-1]))
        if grads:
            inp[0].register_hook(lambda g: grad[i].append(g.reshape(-1, g.shape[-1])))

    hooks = [l.self_attn.o_proj.register_forward_pre_hook(lambda m, inp, i=i: hook(m, inp, i))
             for i, l in enumerate(model.model.layers)]
    with torch.set_grad_enabled(grads):
        for b in batches:
            logits = model(b, use_cache=False).logits
            if grads:
                F.cross_entropy(logits[0, :-1], b[0, 1:]).backward()
    for h in hooks:
        h.remove()
    return ({i: torch.cat(a).double() for i, a in acts.items()},
            {i: torch.cat(g).double() for i, g in grad.items()} if grads else None)


def _head_reference_scores(model, method):
    """Per layer, one score per query head from the eager model: its channels' scores summed (the
    channels of head h are q rows and o columns h * hd .. (h + 1) * hd)."""
    layers, hd = model.model.layers, model.config.head_dim
    acts, grads = _o_inputs(model, CALIB, grads=method in ("taylor", "d2prune"))
    channels = []
    for i, l in enumerate(layers):
        q, o = l.self_attn.q_proj.weight, l.self_attn.o_proj.weight
        if method == "magnitude":
            channels.append((q.double().pow(2).sum(1) + o.double().pow(2).sum(0)).sqrt())
        elif method == "wanda":
            channels.append((o.double().abs() * acts[i].norm(dim=0)).sum(0))
        elif method == "flap":
            channels.append(acts[i].var(dim=0) * o.double().pow(2).sum(0))
        elif method == "d2prune":
            a, g = acts[i], grads[i]
            channels.append(0.5 * ((g * g * a * a).sum(0) + (g * g).sum(0) * a.var(dim=0)))
    if method == "taylor":
        model.zero_grad()
        for b in CALIB:
            F.cross_entropy(model(b, use_cache=False).logits[0, :-1], b[0, 1:]).backward()
        for l in layers:
            q, o = l.self_attn.q_proj.weight, l.self_attn.o_proj.weight
            channels.append((q * q.grad).double().abs().sum(1) + (o * o.grad).double().abs().sum(0))
    model.zero_grad()
    return [c.view(-1, hd).sum(1) for c in channels]  # (H,) per layer


@pytest.mark.parametrize("method", CRITERIA)
def test_kept_heads_match_reference(method, tmp_path):
    """With one query head of every KV group removed, each group loses its weakest head by the
    criterion's score computed from the eager model (a selection flipped to drop the strongest
    heads fails here)."""
    model = tiny()  # 6 query heads in 2 groups of 3
    plan = plan_of(model, spec(method, head_ratio=1 / 3), tmp_path)
    for entry, scores in zip(plan.heads, _head_reference_scores(model, method)):
        weakest = [int(g * 3 + scores[g * 3:(g + 1) * 3].argmin()) for g in range(2)]
        assert entry.keep_heads == sorted(set(range(6)) - set(weakest)), (method, scores)
        assert entry.keep_kv_heads == [0, 1]


def test_standardized_allocation_follows_scores():
    scores = [torch.tensor([5.0, 6.0, 7.0, 8.0]), torch.tensor([1.0, 1.0, 1.0, 100.0])]
    # z-scores: layer 0 spreads evenly, layer 1 has three equal lows: they go first
    assert allocate(scores, 0.5, "standardized", None) == [1, 3]
    assert allocate(scores, 0.5, "uniform", None) == [2, 2]
    outlier = allocate([torch.zeros(100)] * 3, 0.5, "outlier", [0.0, 0.5, 1.0])
    assert sum(outlier) == 150 and outlier[0] > outlier[1] > outlier[2]
    # rounding meets the total exactly, from above and from below, and leaves every layer a unit
    for wanted, total in (([0.0, 5.0, 5.0], 8), ([2.5, 2.5, 9.0], 13)):
        removed = round_to_total(wanted, [10, 10, 10], total)
        assert sum(removed) == total and all(0 <= r <= 9 for r in removed)
