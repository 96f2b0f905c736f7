"""Token dropping and merging: ``schedule`` (cut layers and keep ratios), ``select`` (the method
base class, and what runs inside the graph at a cut) and ``rewrite`` (the compile-time pass)."""

from . import rewrite  # noqa: E402,F401  (registers the family's pass)
