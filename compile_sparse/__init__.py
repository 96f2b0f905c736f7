"""compile_sparse: model compression as a torch.compile backend.

    model.forward = torch.compile(model.forward, backend="sparse", options={...})

The backend is registered through the ``torch_dynamo_backends`` entry point, so importing this
package is not needed for ``backend="sparse"``.
"""

from .analysis import AttentionSite, GraphAnalysis, LinearOp, MLPSite, SkippedRegion, analyze
from .backend import PassError, sparse_backend
from .explain import Report, explain
from .options import RECIPES, SparseOptions, parse_options
from .passes.h2o import H2OConfig
from .passes.hitkv import HitKVConfig
from .passes.knorm import KnormConfig
from .passes.pyramidkv import PyramidKVConfig
from .passes.snapkv import SnapKVConfig
from .passes.streaming_llm import StreamingLLMConfig
from .passes.tova import TOVAConfig
from .transform import transform

__all__ = [
    "AttentionSite", "GraphAnalysis", "LinearOp", "MLPSite", "PassError", "RECIPES", "Report", "SkippedRegion",
    "SparseOptions", "analyze", "explain", "parse_options", "sparse_backend", "transform",
    # KV-cache eviction configs (options={"kv": H2OConfig(compression_ratio=0.75)})
    "H2OConfig", "HitKVConfig", "KnormConfig", "PyramidKVConfig", "SnapKVConfig", "StreamingLLMConfig", "TOVAConfig",
]
__version__ = "0.1.0"
