"""What a pass gets besides the graph, its analysis and its config: no side channels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ..state import BackendState


@dataclass
class PassContext:
    """``example_inputs``: the real tensors the graph's placeholders stand for (parameters
    included); ``state``: what the backend keeps across compiles and calls (KV state, pruning
    plans, calibration norms); ``kernels``: options["kernels"] ("auto" or "interpret");
    ``strict``: options["strict"]; ``reread``: the graph is lowered for a context's re-read
    (compile_sparse.compress_context: a KV method that scores by it keeps its budget then)."""

    example_inputs: Sequence[Any]
    state: BackendState
    kernels: str = "auto"
    strict: bool = False
    reread: bool = False
