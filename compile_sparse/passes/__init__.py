"""The compression passes: ``registry`` (methods by family and name, the pass of each config),
``context`` (what a pass receives), ``toolkit`` (graph-editing helpers the passes share), and one
package per family: ``kv``, ``tokens``, ``prune``. The methods themselves live in
``compile_sparse.methods``, one file each.

Families run in a fixed order: prune (weights) -> tokens -> kv.
"""

from .registry import FAMILIES, METHODS, build, method_of, pass_for, register, register_pass, unregister

__all__ = ["FAMILIES", "METHODS", "build", "method_of", "pass_for", "register", "register_pass", "unregister"]
