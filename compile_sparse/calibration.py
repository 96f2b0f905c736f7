"""Calibration: run a captured graph on calibration batches and collect per-channel statistics of
the activations that pruning criteria read (and, when a criterion needs them, gradients of the
next-token loss with respect to those activations and to chosen weights)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F

from .analysis import is_parameter
from .progress import progress


@dataclass
class ChannelStats:
    """Per-channel sums over every token of an activation (..., C): ``count`` tokens, ``total``
    and ``total_sq`` of the values, and with gradients g = dL/da: ``grad_sq`` = sum g^2 and
    ``grad_sq_act_sq`` = sum g^2 a^2. All (C,) float64."""

    count: int = 0
    total: torch.Tensor | None = None
    total_sq: torch.Tensor | None = None
    grad_sq: torch.Tensor | None = None
    grad_sq_act_sq: torch.Tensor | None = None

    def add(self, act: torch.Tensor) -> None:
        a = act.detach().reshape(-1, act.shape[-1]).double()  # (tokens, C)
        self.count += a.shape[0]
        self.total = _plus(self.total, a.sum(0))
        self.total_sq = _plus(self.total_sq, (a * a).sum(0))

    def add_grad(self, act: torch.Tensor, grad: torch.Tensor) -> None:
        a = act.detach().reshape(-1, act.shape[-1]).double()  # (tokens, C)
        g = grad.detach().reshape(-1, grad.shape[-1]).double()  # (tokens, C)
        self.grad_sq = _plus(self.grad_sq, (g * g).sum(0))
        self.grad_sq_act_sq = _plus(self.grad_sq_act_sq, (g * g * a * a).sum(0))

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def var(self) -> torch.Tensor:
        """Sample variance of each channel over the calibration tokens."""
        return ((self.total_sq - self.total * self.mean) / max(self.count - 1, 1)).clamp_min(0)

    @property
    def norm(self) -> torch.Tensor:
        """The L2 norm of each channel over all calibration tokens (Wanda's ||X_j||)."""
        return self.total_sq.sqrt()


def _plus(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else a + b


@dataclass
class Calibration:
    """What ``calibrate`` collected: ChannelStats per watched node name, and the gradients per
    weight placeholder name summed over the batches (empty without gradients)."""

    stats: dict[str, ChannelStats] = field(default_factory=dict)
    weight_grads: dict[str, torch.Tensor] = field(default_factory=dict)


def _input_ids_placeholder(gm: fx.GraphModule, inputs: Sequence[Any]) -> int:
    """The index of the token-id input: the integer (batch, seq) placeholder that is not a buffer,
    the one named ``input_ids`` when there are several (generate also passes an attention mask)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    candidates = [i for i, node in enumerate(placeholders)
                  if isinstance(inputs[i], torch.Tensor) and not inputs[i].is_floating_point()
                  and inputs[i].dim() == 2 and not is_parameter(node)]
    if len(candidates) > 1:
        candidates = [i for i in candidates if "input_ids" in placeholders[i].name] or candidates
    if len(candidates) != 1:
        names = ", ".join(placeholders[i].name for i in candidates) or "none"
        raise ValueError(f"calibration needs one (batch, seq) integer input (token ids) in the graph; found: {names}")
    return candidates[0]


def _logits(outputs: Any, ids: torch.Tensor) -> torch.Tensor:
    """The floating (B, T, V) graph output whose (B, T) matches the token ids, the widest one if
    several do (logits are wider than hidden states)."""
    flat = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    found = [out for out in flat if isinstance(out, torch.Tensor) and out.is_floating_point() and out.dim() == 3
             and tuple(out.shape[:2]) == tuple(ids.shape)]
    if found:
        return max(found, key=lambda out: out.shape[-1])
    raise ValueError("this criterion needs gradients of the next-token loss, but the graph returns no logits "
                     f"for every position of the {tuple(ids.shape)} input (compile a forward that returns "
                     "full logits, e.g. without logits_to_keep)")


class _Recorder(fx.Interpreter):
    """Runs the graph and adds the value of every watched node (and its gradient) to its ChannelStats."""

    def __init__(self, gm: fx.GraphModule, result: Calibration, watch: set[str], gradients: bool):
        super().__init__(gm)
        self.result, self.watch, self.gradients = result, watch, gradients

    def run_node(self, node: fx.Node) -> Any:
        value = super().run_node(node)
        if node.name in self.watch:
            stats = self.result.stats.setdefault(node.name, ChannelStats())
            stats.add(value)
            if self.gradients and value.requires_grad:
                value.register_hook(lambda grad, act=value, s=stats: s.add_grad(act, grad))
        return value


def calibrate(gm: fx.GraphModule, inputs: Sequence[Any], batches: Sequence[torch.Tensor], watch: Sequence[fx.Node],
              grad_weights: Sequence[fx.Node] = (), gradients: bool = False) -> Calibration:
    """Run ``gm`` once per batch of token ids (each shaped like the graph's own token-id input) and
    collect ChannelStats of the values of ``watch`` nodes. With ``gradients``, also backpropagate
    the next-token cross-entropy: activation gradient statistics, and the gradients of the
    ``grad_weights`` placeholders summed over the batches."""
    index = _input_ids_placeholder(gm, inputs)
    expected = tuple(inputs[index].shape)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    result = Calibration()
    leaves = {}
    # detached, so that calibration never writes .grad into the model's own parameters
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in inputs]
    if gradients:
        for node in grad_weights:
            i = placeholders.index(node)
            leaves[node.name] = args[i] = inputs[i].detach().requires_grad_(True)
    recorder = _Recorder(gm, result, {n.name for n in watch}, gradients)
    for batch in progress(batches, desc="calibrating", unit="batch"):
        if not isinstance(batch, torch.Tensor) or tuple(batch.shape) != expected:
            raise ValueError(f"calibration batches must be token-id tensors shaped like the compiled input "
                             f"{expected}; got {tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__}")
        args[index] = batch.to(inputs[index].device)
        with torch.set_grad_enabled(gradients):
            outputs = recorder.run(*args)
            if gradients:
                logits = _logits(outputs, batch)
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
                loss.backward()
    result.weight_grads = {name: leaf.grad.detach() for name, leaf in leaves.items() if leaf.grad is not None}
    return result

