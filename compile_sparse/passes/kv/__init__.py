"""KV-cache eviction: ``budgets`` (how much each layer keeps), ``scoring`` (the method base class
and the helpers scorers share), ``prefill`` (a prompt's eviction: custom ops the graph calls),
``decode`` (calls over a compressed cache: torch code the graph runs) and ``rewrite`` (the
compile-time pass). All but ``rewrite`` run inside the compiled graph."""

from . import rewrite  # noqa: E402,F401  (registers the family's pass)
