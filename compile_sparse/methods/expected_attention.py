"""ExpectedAttention (Devoto et al., 2025, kvpress's ``ExpectedAttentionPress``): score each key by the
attention the queries still to come are expected to pay it. The prompt's queries, taken back before
RoPE, are modelled as a Gaussian (mean and covariance per query head); RoPE rotates them to the next
``n_future_positions`` positions, averaged into one rotation; a key's expected logit under that
Gaussian is ``scale * mu.k + scale^2 * k^T Sigma k / 2``, softmaxed over the keys, averaged over the
KV group and weighted by the value's norm. Query-agnostic (nothing depends on the last tokens more
than on the others); prompt only.

The rotation is read from the graph: the analysis finds ``q * cos + rotate_half(q) * sin`` before the
attention (``ScoreInputs.rope``), the queries are rotated back with the same tables, and the angle
one position adds is taken from the last two tokens' tables, so scaled RoPE variants need nothing of
their own. Where no RoPE was found (GPT-2's learned positions) the queries are used as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..checks import check_bool, check_int
from ..passes.kv.scoring import KVConfig, ScoreInputs, rope_angles, rotate
from ..passes.registry import register


def mean_future_rotation(cos: torch.Tensor, sin: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean over the next ``count`` positions of RoPE's rotation, as (cos, sin) (B, D), from the
    tables (B, T, D) of a row's tokens (``rope_angles``)."""
    last, step = rope_angles(cos, sin)  # (B, D) each
    ahead = torch.arange(1, count + 1, device=cos.device, dtype=cos.dtype)  # (F,)
    angles = last[:, None, :] + ahead[None, :, None] * step[:, None, :]  # (B, F, D)
    return angles.cos().mean(dim=1), angles.sin().mean(dim=1)


@register("kv", "expected_attention")
@dataclass
class ExpectedAttentionConfig(KVConfig):
    """``n_future_positions``: the positions to come the rotation is averaged over. ``n_sink``: the
    first tokens, always kept and left out of the query statistics. ``use_covariance``: include the
    queries' covariance (else their mean alone). ``use_vnorm``: weight by the value's norm."""

    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True

    READS_ROPE: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "n_future_positions", minimum=1)
        check_int(self, "n_sink", minimum=0)
        check_bool(self, "use_covariance")
        check_bool(self, "use_vnorm")

    def score(self, inputs: ScoreInputs) -> tuple[torch.Tensor, None]:
        """Expected attention of the queries to come (B, Hkv, T); the sinks above everything."""
        query = inputs.query.float()  # (B, H, T, D), after RoPE
        b, h, t, d = query.shape
        keys = inputs.keys.float()  # (B, Hkv, T, D)
        if inputs.rope is not None:
            cos, sin = inputs.rope  # (B, T, D)
            query = rotate(query, cos[:, None], -sin[:, None]) / (cos.square() + sin.square())[:, None]
            mean_cos, mean_sin = mean_future_rotation(cos, sin, self.n_future_positions)  # (B, D)
            # mu . (R k) for the mean rotation R: mu . k' with k' = R^T k
            keys = rotate(keys, mean_cos[:, None, None], -mean_sin[:, None, None])
        # the real queries after the sinks (a row of sinks alone keeps every token: its statistics are unused)
        observed = (inputs.query_positions >= self.n_sink).float()  # (B, T)
        weights = observed / observed.sum(dim=-1, keepdim=True).clamp(min=1)  # (B, T)
        mean = torch.einsum("bhtd,bt->bhd", query, weights)  # (B, H, D)
        grouped = keys.repeat_interleave(inputs.group_size, dim=1)  # (B, H, T, D)
        logits = inputs.scale * torch.einsum("bhtd,bhd->bht", grouped, mean)  # (B, H, T)
        if self.use_covariance:
            centered = (query - mean[:, :, None]) * weights[:, None, :, None].sqrt()  # (B, H, T, D)
            covariance = centered.transpose(-1, -2) @ centered  # (B, H, D, D)
            logits = logits + inputs.scale ** 2 / 2 * ((grouped @ covariance) * grouped).sum(dim=-1)
        real = inputs.valid  # (B, Hkv, T)
        sink = real & (inputs.positions < self.n_sink)
        logits = logits.masked_fill(~(real & ~sink).repeat_interleave(inputs.group_size, dim=1), float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a row of sinks alone: zeros
        scores = probs.view(b, h // inputs.group_size, inputs.group_size, t).mean(dim=2)  # (B, Hkv, T)
        if self.use_vnorm:
            scores = scores * inputs.values.float().norm(dim=-1)
        top = scores.amax(dim=-1, keepdim=True) + 1
        return torch.where(sink, top, scores), None
