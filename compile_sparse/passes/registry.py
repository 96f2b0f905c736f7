"""The one registry of compression methods. A leaf module: it imports nothing of the package.

A method is a config dataclass registered under a family and a name; the family's base class
declares the hook the method writes (``score`` for KV eviction and structured pruning, ``select``
for token reduction) and the compile-time pass of the family is registered once for that base
class (torchao's config -> handler registry). A method with a pass of its own (N:M masking, a
saved plan) registers that pass for its own config class::

    @register("kv", "knorm")
    @dataclass
    class KnormConfig(KVConfig):
        def score(self, inputs): ...

Options, the CLI, explain, the graph's run-time ops and the tests all resolve methods here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

FAMILIES = ("prune", "tokens", "kv")  # the order the passes run in: weights, then tokens, then the cache

METHODS: dict[str, dict[str, type]] = {family: {} for family in FAMILIES}  # family -> name -> config class
_NAMES: dict[type, tuple[str, str]] = {}  # config class -> (family, name)
_PASSES: dict[type, Callable] = {}  # config class (a family base, or a method's own) -> pass function


def register(family: str, name: str) -> Callable[[type], type]:
    """Class decorator: make the config dataclass available as ``options[family] = name``."""
    if family not in METHODS:
        raise ValueError(f"unknown family {family!r}; families: {', '.join(FAMILIES)}")

    def add(cls: type) -> type:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} must be a dataclass to be registered as a method")
        if name in METHODS[family] or cls in _NAMES:
            raise ValueError(f"{family} method {name!r} or its config {cls.__name__} is already registered")
        METHODS[family][name] = cls
        _NAMES[cls] = (family, name)
        return cls

    return add


def unregister(family: str, name: str) -> None:
    """Remove a method (plug-ins and tests that register their own)."""
    cls = METHODS[family].pop(name)
    del _NAMES[cls]


def register_pass(config_type: type) -> Callable[[Callable], Callable]:
    """Decorator: ``fn(gm, analysis, config, ctx) -> PassResult`` applies every config that is an
    instance of ``config_type`` (the nearest registered class in the config's MRO wins)."""

    def add(fn: Callable) -> Callable:
        _PASSES[config_type] = fn
        return fn

    return add


def method_of(config: object) -> tuple[str, str]:
    """(family, name) of a config object of a registered method."""
    found = _NAMES.get(type(config))
    if found is None:
        known = ", ".join(sorted(c.__name__ for c in _NAMES)) or "none yet"
        raise ValueError(f"{type(config).__name__} is not the config of a registered method; registered: {known}")
    return found


def pass_for(config: object) -> Callable:
    """The pass that applies ``config``."""
    for cls in type(config).__mro__:
        if cls in _PASSES:
            return _PASSES[cls]
    raise ValueError(f"no pass is registered for {type(config).__name__} or its base classes")


def available(family: str) -> str:
    return ", ".join(sorted(METHODS[family])) or "none yet"


def config_class(family: str, name: str) -> type:
    """The config class of a registered method; the error lists the family's methods."""
    if family not in METHODS:
        raise ValueError(f"unknown family {family!r}; families: {', '.join(FAMILIES)}")
    cls = METHODS[family].get(name)
    if cls is None:
        raise ValueError(f"unknown {family} method {name!r}; available {family} methods: {available(family)}")
    return cls


def build(family: str, name: str, params: Mapping[str, Any]) -> Any:
    """A validated config of method ``name``; every error names the family and the method."""
    cls = config_class(family, name)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)} for {family} method {name!r}; "
                         f"valid parameters: {', '.join(valid) or 'none'}")
    try:
        return cls(**params)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{family} method {name!r}: {err}") from None


def params_of(config: object) -> dict[str, Any]:
    """The config's fields as a dict (the inverse of ``build``)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
