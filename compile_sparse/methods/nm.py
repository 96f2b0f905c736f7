"""N:M semi-structured sparsity (2:4 by default): in every group of M consecutive input weights of
each output row, keep the N with the highest Wanda score |W_ij| x ||X_j|| (or |W_ij| with
``criterion="magnitude"``), for every projection of the attention and MLP sites. The weights are
masked (zeros stored densely): the shapes stay, the zeros are exactly N:M, ready for a sparse
GEMM. A pass of its own: it masks weights in place of slicing them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.fx as fx

from ..analysis import GraphAnalysis, LinearOp, as_linear
from ..calibration import calibrate
from ..checks import check_choice, check_int
from ..passes.context import PassContext
from ..passes.registry import register, register_pass
from ..passes.toolkit import add_buffer, out_in, remove_dead_code, weight_value
from ..report import PassResult

NM_CRITERIA = ("wanda", "magnitude")


@register("prune", "nm")
@dataclass
class NMSparsityConfig:
    """Keep ``n`` of every ``m`` input weights per output row (n = m keeps all); ``criterion``
    "wanda" needs ``calibration`` (token-id batches shaped like the compiled input)."""

    n: int = 2
    m: int = 4
    criterion: str = "wanda"
    calibration: Sequence[torch.Tensor] | None = None

    def __post_init__(self):
        check_int(self, "n", "m")
        if self.n > self.m:
            raise ValueError(f"n must be at most m, got n={self.n}, m={self.m}")
        check_choice(self, "criterion", NM_CRITERIA)
        if self.criterion == "wanda" and self.calibration is None:
            raise ValueError("criterion 'wanda' needs calibration batches; pass calibration=[token ids, ...] "
                             "or criterion='magnitude'")

    def needs_calibration(self) -> bool:
        return self.criterion == "wanda"


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """score: (out, in) with in divisible by m -> bool mask (out, in), n True per group of m."""
    out, inp = score.shape
    groups = score.reshape(out, inp // m, m)  # (out, in/m, m)
    keep = groups.topk(n, dim=-1).indices  # (out, in/m, n)
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(out, inp)  # (out, in)


def _input_norms(gm: fx.GraphModule, analysis: GraphAnalysis, config: NMSparsityConfig, linears: list[LinearOp],
                 ctx: PassContext) -> dict[str, torch.Tensor]:
    """Weight node name -> the L2 norm of each input channel over the calibration tokens (in,),
    kept per (batches, weight) in the backend's state: the decode graphs of generate() reuse the
    prefill's calibration (they have no token-id input of the calibration shape)."""
    if config.criterion != "wanda":
        return {}
    batches = tuple(id(b) for b in config.calibration)
    weights = {lin.weight.name: weight_value(gm, lin.weight, analysis.inputs) for lin in linears}
    missing = [lin for lin in linears if ctx.state.norms.get([weights[lin.weight.name]], batches) is None]
    if missing:
        calib = calibrate(gm, analysis.inputs, config.calibration, [lin.input for lin in missing])
        for lin in missing:
            ctx.state.norms.put([weights[lin.weight.name]], batches, calib.stats[lin.input.name].norm)
    return {name: ctx.state.norms.get([weight], batches) for name, weight in weights.items()}


@register_pass(NMSparsityConfig)
def nm_sparsity_pass(gm: fx.GraphModule, analysis: GraphAnalysis, config: NMSparsityConfig,
                     ctx: PassContext) -> PassResult:
    linears: list[tuple[str, LinearOp]] = []
    for site in analysis.attention:
        linears += [(f"{site.name} {k}", getattr(site, k)) for k in ("q", "k", "v", "o")
                    if getattr(site, k) is not None]
    for site in analysis.mlp:
        linears += [(f"{site.name} {k}", getattr(site, k)) for k in ("gate", "up", "down")
                    if getattr(site, k) is not None]
    # fused qkv appears three times, a fused gate_up twice: each projection is masked whole, once
    unique = {id(lin.node): (label, lin if lin.part is None else as_linear(lin.node)) for label, lin in linears}
    result = PassResult("nm", "prune", rewrites={"linear": 0})
    if config.n == config.m:
        return result
    bad = [label for label, lin in unique.values() if lin.in_features % config.m]
    if bad:
        raise ValueError(f"{config.n}:{config.m} needs input widths divisible by {config.m}; not: {', '.join(bad)}")
    norms = _input_norms(gm, analysis, config, [lin for _, lin in unique.values()], ctx)
    before = after = 0
    for label, lin in unique.values():
        weight = weight_value(gm, lin.weight, analysis.inputs)
        rows = out_in(lin, weight)  # (out, in)
        score = rows.abs().double()
        if config.criterion == "wanda":
            score = score * norms[lin.weight.name]
        masked = rows * nm_mask(score, config.n, config.m)
        new = add_buffer(gm, lin.weight.name, masked if lin.weight_layout == "out_in" else masked.t())
        lin.weight.replace_all_uses_with(new)
        before += weight.numel()
        after += int((masked != 0).sum())
        result.rewrites["linear"] += 1
        result.sites[label] = f"{config.n}:{config.m}, {1 - config.n / config.m:.0%} of {weight.numel():,} weights zero"
    remove_dead_code(gm)
    result.params = {"before": before, "after": after}
    return result
