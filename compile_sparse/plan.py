"""A pruning Plan: which MLP neurons and attention heads each layer keeps, by parameter name.

A structured pruning pass computes a Plan (scores from calibration data, then an allocation) and
applies it to the graph. The Plan is plain JSON: save it, pass it back with
``options={"prune": {"method": "plan", "plan": "plan.json"}}`` (no calibration the second time),
or write a physically smaller checkpoint with ``compile_sparse.export``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

FORMAT = "compile_sparse.plan/1"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_count(where: str, name: str, value: Any) -> None:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{where}: {name} must be an int >= 1, got {value!r}")


def _check_units(where: str, name: str, values: Any, width: int) -> None:
    """``values`` are sorted unique ints in [0, width), at least one."""
    if not isinstance(values, list) or not all(_is_int(v) for v in values):
        raise ValueError(f"{where}: {name} must be a list of ints, got {str(values)[:80]}")
    if not values:
        raise ValueError(f"{where}: {name} is empty: every layer keeps at least one unit")
    if values != sorted(set(values)):
        raise ValueError(f"{where}: {name} must be sorted without duplicates, got {str(values)[:80]}")
    if values[0] < 0 or values[-1] >= width:
        raise ValueError(f"{where}: {name} must lie in [0, {width}), got {values[0]} .. {values[-1]}")


def _check_weights(where: str, weights: Any, keys: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    if not isinstance(weights, dict) or set(weights) != set(keys):
        raise ValueError(f"{where}: weights must name {', '.join(keys)}, got {weights!r}")
    for key in keys:
        if not isinstance(weights[key], str) and not (key in optional and weights[key] is None):
            raise ValueError(f"{where}: weights[{key!r}] must be a parameter name, got {weights[key]!r}")


def _check_bias(where: str, bias: Any) -> None:
    if bias is not None and (not isinstance(bias, list) or not bias
                             or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bias)):
        raise ValueError(f"{where}: bias must be null or a non-empty list of numbers, got {str(bias)[:80]}")


@dataclass
class MLPPlan:
    """One MLP keeps intermediate neurons ``keep`` (sorted) of ``width``. ``weights`` names the
    parameters (``{"gate": ..., "up": ..., "down": ...}``, gate None for a plain MLP); ``bias``,
    when set, is added to the down projection's output (FLAP's compensation, length hidden).
    ``offsets``: for gate and up fused in one parameter (Phi-3's ``gate_up_proj``, split by
    ``chunk``; then gate and up name the same parameter), the first row of each,
    ``{"gate": 0, "up": width}``; None for separate projections."""

    layer: int
    width: int
    keep: list[int]
    weights: dict[str, str | None]
    bias: list[float] | None = None
    offsets: dict[str, int] | None = None

    def __post_init__(self) -> None:
        where = f"plan layer {self.layer} MLP"
        if not _is_int(self.layer) or self.layer < 0:
            raise ValueError(f"{where}: layer must be an int >= 0, got {self.layer!r}")
        _check_count(where, "width", self.width)
        _check_units(where, "keep", self.keep, self.width)
        _check_weights(where, self.weights, ("gate", "up", "down"), optional=("gate",))
        _check_bias(where, self.bias)
        fused = self.weights["gate"] is not None and self.weights["gate"] == self.weights["up"]
        if fused != (self.offsets is not None):
            raise ValueError(f"{where}: offsets must be given exactly when gate and up name one parameter, got "
                             f"offsets {self.offsets!r} for weights {self.weights!r}")
        if fused and (not isinstance(self.offsets, dict) or set(self.offsets) != {"gate", "up"}
                      or sorted(self.offsets.values()) != [0, self.width]):
            raise ValueError(f"{where}: offsets must be {{'gate': 0, 'up': {self.width}}} or the reverse, got {self.offsets!r}")

    def producer_rows(self) -> dict[str, torch.Tensor]:
        """Parameter name -> the output rows the gate and up projections keep: ``keep`` each, or
        for a fused parameter the kept rows of both halves, in the parameter's order."""
        keep = torch.tensor(self.keep, dtype=torch.long)
        if self.offsets is None:
            return {self.weights[k]: keep for k in ("gate", "up") if self.weights[k] is not None}
        halves = sorted(self.offsets.values())
        return {self.weights["up"]: torch.cat([keep + start for start in halves])}


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

    def __post_init__(self) -> None:
        where = f"plan layer {self.layer} attention"
        if not _is_int(self.layer) or self.layer < 0:
            raise ValueError(f"{where}: layer must be an int >= 0, got {self.layer!r}")
        for name in ("num_heads", "num_kv_heads", "head_dim"):
            _check_count(where, name, getattr(self, name))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{where}: {self.num_heads} query heads cannot share {self.num_kv_heads} KV heads")
        _check_units(where, "keep_heads", self.keep_heads, self.num_heads)
        _check_units(where, "keep_kv_heads", self.keep_kv_heads, self.num_kv_heads)
        group = self.num_heads // self.num_kv_heads
        per_kv = {kv: sum(1 for h in self.keep_heads if h // group == kv) for kv in self.keep_kv_heads}
        if sorted({h // group for h in self.keep_heads}) != self.keep_kv_heads or len(set(per_kv.values())) != 1:
            raise ValueError(f"{where}: keep_kv_heads {self.keep_kv_heads} must be the KV heads of keep_heads "
                             f"{self.keep_heads}, each keeping the same number of query heads")
        _check_weights(where, self.weights, ("q", "k", "v", "o"))
        _check_bias(where, self.bias)


def _entry(cls: type, data: Any, where: str) -> Any:
    """A plan entry from its JSON dict: required fields present, no unknown ones."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    required = [name for name, f in fields.items() if f.default is dataclasses.MISSING]
    missing = [name for name in required if name not in data]
    unknown = sorted(set(data) - set(fields))
    layer = data.get("layer", "?")
    if missing or unknown:
        raise ValueError(f"{where} (layer {layer}): " + "; ".join(
            ([f"missing field(s) {', '.join(missing)}"] if missing else []) +
            ([f"unknown field(s) {', '.join(unknown)}"] if unknown else [])))
    return cls(**data)


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
                "mlp": [{k: v for k, v in asdict(m).items() if k != "offsets" or v is not None} for m in self.mlp], "heads": [asdict(h) for h in self.heads]}

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        """A Plan from its JSON form, validated: a plan edited by hand fails here, naming the layer
        and the field, not deep inside the graph."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"not a compile_sparse plan: format {found!r}, expected {FORMAT!r}")
        for key in ("method", "mlp", "heads"):
            if key not in data:
                raise ValueError(f"plan: missing field {key!r}")
        if not isinstance(data["mlp"], list) or not isinstance(data["heads"], list):
            raise ValueError("plan: 'mlp' and 'heads' must be lists")
        plan = cls(data["method"], [_entry(MLPPlan, m, "plan MLP entry") for m in data["mlp"]],
                   [_entry(HeadPlan, h, "plan attention entry") for h in data["heads"]])
        for kind, entries in (("MLP", plan.mlp), ("attention", plan.heads)):
            lengths = {len(e.bias) for e in entries if e.bias is not None}
            if len(lengths) > 1:
                raise ValueError(f"plan: the {kind} compensation biases have different lengths {sorted(lengths)}")
        return plan

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
