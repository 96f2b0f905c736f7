"""Parsing and validation of ``torch.compile(..., backend="sparse", options=...)``.

Keys: one per family (``"prune"``, ``"tokens"``, ``"kv"``), each a method name, a dict
``{"method": name, **params}`` or a config object; ``"recipe"`` (a named preset whose keys the
explicit ones override; a parameter dict without "method" adds to the preset's parameters, e.g.
``{"recipe": "prune-mlp20", "prune": {"calibration": batches}}``; options that name no method and
no recipe get the default recipe); ``"lowering"`` (``"inductor"`` or ``"eager"``); ``"kernels"`` (``"auto"``:
the Triton kernels on CUDA tensors and torch code on CPU; ``"interpret"``: the Triton kernels on CPU
too, under Triton's interpreter, for debugging; set TRITON_INTERPRET=1 before triton is imported);
``"strict"`` (``True``: anything the options ask for that cannot be done is an error, not a
warning); ``"debug_dir"``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from .passes.registry import FAMILIES, available, build, method_of, params_of
from .plan import Plan
from .recipes import DEFAULT_RECIPE, RECIPES

LOWERINGS = ("inductor", "eager")
KERNELS = ("auto", "interpret")
VALID_KEYS = FAMILIES + ("recipe", "lowering", "kernels", "strict", "debug_dir")


@dataclass
class SparseOptions:
    """Validated options: ``methods`` maps a family to its config object, in pass order."""

    methods: dict[str, object] = field(default_factory=dict)
    recipe: str | None = None
    lowering: str = "inductor"
    kernels: str = "auto"
    strict: bool = False
    debug_dir: Path | None = None

    def to_dict(self) -> dict:
        methods = {}
        for family, config in self.methods.items():
            params = {name: _jsonable(value) for name, value in params_of(config).items()}
            methods[family] = {"method": method_of(config)[1], **params}
        return {**methods, "recipe": self.recipe, "lowering": self.lowering, "kernels": self.kernels,
                "strict": self.strict, "debug_dir": str(self.debug_dir) if self.debug_dir else None}


def _jsonable(value: Any) -> Any:
    """A parameter as the report shows it: calibration batches and plans summarized."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return f"{len(value)} batches of {tuple(value[0].shape)}"
    if isinstance(value, Plan):
        return f"plan ({value.method}: {len(value.mlp)} MLPs, {len(value.heads)} attention blocks)"
    return value


def _config(family: str, value: Any) -> object:
    """A config object for ``options[family]``: from a name, a dict with "method", or a config."""
    if isinstance(value, str):
        value = {"method": value}
    if not isinstance(value, Mapping):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            config_family = method_of(value)[0]
            if config_family != family:
                raise ValueError(f"options[{family!r}] got a {config_family} config ({type(value).__name__})")
            return value
        raise ValueError(f"options[{family!r}] must be a method name, a dict with 'method', or a config object; "
                         f"got {value!r}")
    params = dict(value)
    name = params.pop("method", None)
    if name is None:
        raise ValueError(f"options[{family!r}] = {value!r} has no 'method'; available {family} methods: {available(family)}")
    return build(family, name, params)


def merge_option(preset: Any, given: Any) -> Any:
    """An explicit option over a recipe's: a dict of parameters without "method" (or with the
    recipe's method) adds to the recipe's parameters for that family, anything else replaces them."""
    if isinstance(preset, Mapping) and isinstance(given, Mapping) and given.get("method", preset.get("method")) == preset.get("method"):
        return {**preset, **given}
    return given


def apply_recipe(options: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """The recipe ``options`` ask for (the default when they name no method and no recipe) and the
    options with its entries merged in (``merge_option``), keys checked, "recipe" removed."""
    if "recipe" not in options and not any(family in options for family in FAMILIES):
        options = {**options, "recipe": DEFAULT_RECIPE}  # nothing chosen: the default compression
    unknown = sorted(set(options) - set(VALID_KEYS))
    if unknown:
        raise ValueError(f"unknown option key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(VALID_KEYS)}")
    merged = dict(options)
    recipe = merged.pop("recipe", None)
    if recipe is not None:
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; recipes: {', '.join(sorted(RECIPES))}")
        merged = {key: merge_option(RECIPES[recipe].get(key), merged[key]) if key in merged else value
                  for key, value in {**RECIPES[recipe], **merged}.items()}
    return recipe, merged


def parse_options(options: Mapping[str, Any] | str | None) -> SparseOptions:
    """Validate ``options`` (a dict, its JSON text, or None for the default recipe)."""
    if isinstance(options, str):
        try:
            options = json.loads(options)
        except json.JSONDecodeError as err:
            raise ValueError(f"options are not valid JSON: {err}") from None
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise ValueError(f"options must be a dict, got {type(options).__name__}")
    recipe, merged = apply_recipe(options)
    lowering = merged.pop("lowering", "inductor")
    if lowering not in LOWERINGS:
        raise ValueError(f"unknown lowering {lowering!r}; valid: {', '.join(LOWERINGS)}")
    kernels = merged.pop("kernels", "auto")
    if kernels not in KERNELS:
        raise ValueError(f"unknown kernels {kernels!r}; valid: {', '.join(KERNELS)}")
    strict = merged.pop("strict", False)
    if not isinstance(strict, bool):
        raise ValueError(f"strict must be True or False, got {strict!r}")
    debug_dir = merged.pop("debug_dir", None)
    methods = {family: _config(family, merged[family]) for family in FAMILIES if merged.get(family) is not None}
    return SparseOptions(methods=methods, recipe=recipe, lowering=lowering, kernels=kernels, strict=strict,
                         debug_dir=Path(debug_dir) if debug_dir is not None else None)
