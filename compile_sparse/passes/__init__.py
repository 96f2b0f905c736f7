"""Compression passes and the registry that maps a method's config to its pass.

One method per file: its config dataclass (validated in ``__post_init__``) beside its pass, added
to the registry with ``@register("kv", "snapkv", SnapKVConfig)``. A pass takes the graph, the
analysis of it and its config, rewrites the graph in place and returns a PassResult that counts
every rewrite.

Families run in a fixed order: prune (weights) -> tokens -> kv.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.fx as fx

from ..analysis import GraphAnalysis

FAMILIES = ("prune", "tokens", "kv")


@dataclass
class PassResult:
    """What one pass did: ``rewrites`` counts rewritten sites per kind of rewrite, ``sites`` says
    what changed per site (``{"layer 3 attention": "kept 256 of 1024 tokens"}``), ``kv_cache_bytes``
    the KV cache this graph hands back, before and after the pass (``{"before": n, "after": m}``,
    empty when the pass does not touch the cache or the sizes are symbolic), ``params`` the
    parameters of the sites it prunes, before and after (empty for passes that prune nothing)."""

    method: str
    family: str
    rewrites: dict[str, int] = field(default_factory=dict)
    sites: dict[str, str] = field(default_factory=dict)
    kv_cache_bytes: dict[str, int] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"method": self.method, "family": self.family, "rewrites": dict(self.rewrites),
                "sites": dict(self.sites), "kv_cache_bytes": dict(self.kv_cache_bytes), "params": dict(self.params)}


PassFn = Callable[[fx.GraphModule, GraphAnalysis, object], PassResult]


@dataclass(frozen=True)
class Method:
    family: str
    name: str
    config: type
    apply: PassFn


METHODS: dict[str, dict[str, Method]] = {family: {} for family in FAMILIES}
_BY_CONFIG: dict[type, Method] = {}


def register(family: str, name: str, config: type) -> Callable[[PassFn], PassFn]:
    """Decorator: make ``name`` (configured by ``config``) available under ``options[family]``."""
    if family not in METHODS:
        raise ValueError(f"unknown family {family!r}; families: {', '.join(FAMILIES)}")

    def add(fn: PassFn) -> PassFn:
        if name in METHODS[family] or config in _BY_CONFIG:
            raise ValueError(f"{family} method {name!r} or its config {config.__name__} is already registered")
        method = Method(family, name, config, fn)
        METHODS[family][name] = method
        _BY_CONFIG[config] = method
        return fn

    return add


def unregister(family: str, name: str) -> None:
    """Remove a method (for plug-ins and tests that register their own)."""
    method = METHODS[family].pop(name)
    del _BY_CONFIG[method.config]


def method_for_config(config: object) -> Method:
    """The registered method a config object belongs to."""
    method = _BY_CONFIG.get(type(config))
    if method is None:
        known = ", ".join(sorted(c.__name__ for c in _BY_CONFIG)) or "none yet"
        raise ValueError(f"{type(config).__name__} is not the config of a registered method; registered: {known}")
    return method


# The methods register themselves on import (after the registry above exists).
from . import (d2prune, evit, flap, h2o, hitkv, knorm, lazyllm, magnitude, nm_sparsity, pyramidkv,  # noqa: E402,F401
               saved_plan, snapkv, streaming_llm, taylor, tome, tova, wanda)
