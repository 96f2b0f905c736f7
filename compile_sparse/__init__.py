"""compile_sparse: model compression as a torch.compile backend.

    model.forward = torch.compile(model.forward, backend="sparse", options={...})

The backend is registered through the ``torch_dynamo_backends`` entry point, so importing this
package is not needed for ``backend="sparse"``.
"""

from .analysis import AttentionSite, GraphAnalysis, LinearOp, MLPSite, SkippedRegion, analyze
from .backend import PassError, sparse_backend
from .explain import Report, explain
from .export import export
from .options import RECIPES, SparseOptions, parse_options
from .passes.d2prune import D2PruneConfig
from .passes.flap import FLAPConfig
from .passes.h2o import H2OConfig
from .passes.hitkv import HitKVConfig
from .passes.knorm import KnormConfig
from .passes.magnitude import MagnitudeConfig
from .passes.nm_sparsity import NMSparsityConfig
from .passes.pyramidkv import PyramidKVConfig
from .passes.saved_plan import PlanConfig
from .passes.snapkv import SnapKVConfig
from .passes.streaming_llm import StreamingLLMConfig
from .passes.taylor import TaylorConfig
from .passes.tova import TOVAConfig
from .passes.wanda import WandaConfig
from .plan import Plan
from .transform import transform

__all__ = [
    "AttentionSite", "GraphAnalysis", "LinearOp", "MLPSite", "PassError", "RECIPES", "Report", "SkippedRegion",
    "SparseOptions", "analyze", "explain", "export", "parse_options", "sparse_backend", "transform",
    # KV-cache eviction configs (options={"kv": H2OConfig(compression_ratio=0.75)})
    "H2OConfig", "HitKVConfig", "KnormConfig", "PyramidKVConfig", "SnapKVConfig", "StreamingLLMConfig", "TOVAConfig",
    # pruning configs (options={"prune": WandaConfig(mlp_ratio=0.2, calibration=batches)}) and plans
    "D2PruneConfig", "FLAPConfig", "MagnitudeConfig", "NMSparsityConfig", "Plan", "PlanConfig", "TaylorConfig",
    "WandaConfig",
]
__version__ = "0.1.0"
