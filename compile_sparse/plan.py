"""A pruning Plan: which MLP neurons and attention heads each layer keeps, by parameter name.

A structured pruning pass computes a Plan (scores from calibration data, then an allocation) and
applies it to the graph. The Plan is plain JSON: save it, pass it back with
``options={"prune": {"method": "plan", "plan": "plan.json"}}`` (no calibration the second time),
or write a physically smaller checkpoint with ``compile_sparse.export``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

FORMAT = "compile_sparse.plan/1"


@dataclass
class MLPPlan:
    """One MLP keeps intermediate neurons ``keep`` (sorted) of ``width``. ``weights`` names the
    parameters (``{"gate": ..., "up": ..., "down": ...}``, gate None for a plain MLP); ``bias``,
    when set, is added to the down projection's output (FLAP's compensation, length hidden)."""

    layer: int
    width: int
    keep: list[int]
    weights: dict[str, str | None]
    bias: list[float] | None = None


@dataclass
class HeadPlan:
    """One attention block keeps query heads ``keep_heads`` of ``num_heads`` and KV heads
    ``keep_kv_heads`` of ``num_kv_heads`` (sorted); every kept KV head keeps the same number of
    query heads. ``weights`` names q / k / v / o; ``bias`` is added to the o projection's output."""

    layer: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    keep_heads: list[int]
    keep_kv_heads: list[int]
    weights: dict[str, str]
    bias: list[float] | None = None


def head_channels(heads: list[int], head_dim: int) -> torch.Tensor:
    """The channels (q / k / v rows, o columns) of ``heads``: h * head_dim .. (h + 1) * head_dim each."""
    return torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)], dtype=torch.long)


@dataclass
class Plan:
    method: str
    mlp: list[MLPPlan] = field(default_factory=list)
    heads: list[HeadPlan] = field(default_factory=list)

    def is_uniform(self) -> bool:
        """Every MLP keeps the same width and every attention block the same head counts."""
        return (len({len(m.keep) for m in self.mlp}) <= 1
                and len({(len(h.keep_heads), len(h.keep_kv_heads)) for h in self.heads}) <= 1)

    def has_bias(self) -> bool:
        return any(p.bias is not None for p in [*self.mlp, *self.heads])

    def to_dict(self) -> dict:
        return {"format": FORMAT, "method": self.method,
                "mlp": [asdict(m) for m in self.mlp], "heads": [asdict(h) for h in self.heads]}

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        if data.get("format") != FORMAT:
            raise ValueError(f"not a compile_sparse plan: format {data.get('format')!r}, expected {FORMAT!r}")
        return cls(data["method"], [MLPPlan(**m) for m in data["mlp"]], [HeadPlan(**h) for h in data["heads"]])

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict()))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no plan file at {path}")
        return cls.from_dict(json.loads(path.read_text()))
