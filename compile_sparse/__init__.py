"""compile_sparse: model compression as a torch.compile backend.

    model.forward = torch.compile(model.forward, backend="sparse", options={...})

The backend is registered through the ``torch_dynamo_backends`` entry point, so importing this
package is not needed for ``backend="sparse"``.
"""

from .analysis import AttentionSite, GraphAnalysis, LinearOp, MLPSite, SkippedRegion, analyze
from .backend import PassError, sparse_backend
from .explain import Report, explain
from .options import RECIPES, SparseOptions, parse_options
from .transform import transform

__all__ = [
    "AttentionSite", "GraphAnalysis", "LinearOp", "MLPSite", "PassError", "RECIPES", "Report", "SkippedRegion",
    "SparseOptions", "analyze", "explain", "parse_options", "sparse_backend", "transform",
]
__version__ = "0.1.0"
