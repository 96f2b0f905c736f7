"""KV-cache eviction: ``budgets`` (how much each layer keeps), ``scoring`` (the method base class
and the helpers scorers share; runs inside the compiled graph), ``evict`` (top-k and gather of one
layer's cache; runs inside the graph) and ``rewrite`` (the compile-time pass)."""

from . import rewrite  # noqa: E402,F401  (registers the family's pass)
