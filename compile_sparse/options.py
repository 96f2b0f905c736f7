"""Parsing and validation of ``torch.compile(..., backend="sparse", options=...)``.

Keys: one per family (``"prune"``, ``"tokens"``, ``"kv"``), each a method name, a dict
``{"method": name, **params}`` or a config object; ``"recipe"`` (a named preset whose keys the
explicit ones override); ``"lowering"`` (``"inductor"`` or ``"eager"``); ``"kernels"`` (``"auto"``:
the Triton kernels on CUDA tensors and torch code on CPU; ``"interpret"``: the Triton kernels on CPU
too, under Triton's interpreter, for debugging; set TRITON_INTERPRET=1 before triton is imported);
``"debug_dir"``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from .passes import FAMILIES, METHODS, method_for_config
from .plan import Plan

LOWERINGS = ("inductor", "eager")
KERNELS = ("auto", "interpret")
VALID_KEYS = FAMILIES + ("recipe", "lowering", "kernels", "debug_dir")

# Named presets. Every entry is measured in docs/results.md with the command that measured it.
RECIPES: dict[str, dict[str, Any]] = {
    # No compression: the analysis runs, nothing is rewritten, outputs equal eager.
    "dense": {},
}
DEFAULT_RECIPE = "dense"


@dataclass
class SparseOptions:
    """Validated options: ``methods`` maps a family to its config object, in pass order."""

    methods: dict[str, object] = field(default_factory=dict)
    recipe: str | None = None
    lowering: str = "inductor"
    kernels: str = "auto"
    debug_dir: Path | None = None

    def to_dict(self) -> dict:
        methods = {}
        for family, config in self.methods.items():
            params = {f.name: _jsonable(getattr(config, f.name)) for f in dataclasses.fields(config)}
            methods[family] = {"method": method_for_config(config).name, **params}
        return {**methods, "recipe": self.recipe, "lowering": self.lowering, "kernels": self.kernels,
                "debug_dir": str(self.debug_dir) if self.debug_dir else None}


def _jsonable(value: Any) -> Any:
    """A parameter as the report shows it: calibration batches and plans summarized."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return f"{len(value)} batches of {tuple(value[0].shape)}"
    if isinstance(value, Plan):
        return f"plan ({value.method}: {len(value.mlp)} MLPs, {len(value.heads)} attention blocks)"
    return value


def _available(family: str) -> str:
    return ", ".join(sorted(METHODS[family])) or "none yet"


def _config(family: str, value: Any) -> object:
    """A config object for ``options[family]``: from a name, a dict with "method", or a config."""
    if isinstance(value, str):
        value = {"method": value}
    if not isinstance(value, Mapping):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            method = method_for_config(value)
            if method.family != family:
                raise ValueError(f"options[{family!r}] got a {method.family} config ({type(value).__name__})")
            return value
        raise ValueError(f"options[{family!r}] must be a method name, a dict with 'method', or a config object; "
                         f"got {value!r}")
    params = dict(value)
    name = params.pop("method", None)
    if name is None:
        raise ValueError(f"options[{family!r}] = {value!r} has no 'method'; available {family} methods: {_available(family)}")
    method = METHODS[family].get(name)
    if method is None:
        raise ValueError(f"unknown {family} method {name!r}; available {family} methods: {_available(family)}")
    valid = [f.name for f in dataclasses.fields(method.config)]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)} for {family} method {name!r}; "
                         f"valid parameters: {', '.join(valid) or 'none'}")
    return method.config(**params)


def parse_options(options: Mapping[str, Any] | str | None) -> SparseOptions:
    """Validate ``options`` (a dict, its JSON text, or None for the default recipe)."""
    if isinstance(options, str):
        try:
            options = json.loads(options)
        except json.JSONDecodeError as err:
            raise ValueError(f"options are not valid JSON: {err}") from None
    if options is None or len(options) == 0:
        options = {"recipe": DEFAULT_RECIPE}
    if not isinstance(options, Mapping):
        raise ValueError(f"options must be a dict, got {type(options).__name__}")
    unknown = sorted(set(options) - set(VALID_KEYS))
    if unknown:
        raise ValueError(f"unknown option key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(VALID_KEYS)}")
    merged = dict(options)
    recipe = merged.pop("recipe", None)
    if recipe is not None:
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; recipes: {', '.join(sorted(RECIPES))}")
        merged = {**RECIPES[recipe], **merged}
    lowering = merged.pop("lowering", "inductor")
    if lowering not in LOWERINGS:
        raise ValueError(f"unknown lowering {lowering!r}; valid: {', '.join(LOWERINGS)}")
    kernels = merged.pop("kernels", "auto")
    if kernels not in KERNELS:
        raise ValueError(f"unknown kernels {kernels!r}; valid: {', '.join(KERNELS)}")
    debug_dir = merged.pop("debug_dir", None)
    methods = {family: _config(family, merged[family]) for family in FAMILIES if merged.get(family) is not None}
    return SparseOptions(methods=methods, recipe=recipe, lowering=lowering, kernels=kernels,
                         debug_dir=Path(debug_dir) if debug_dir is not None else None)
