"""compile_sparse: model compression as a torch.compile backend.

    model.forward = torch.compile(model.forward, backend="sparse", options={...})

The backend is registered through the ``torch_dynamo_backends`` entry point, so importing this
package is not needed for ``backend="sparse"``.
"""

import sys

from . import cache
from . import methods  # noqa: F401  every method registers itself: compile_sparse/methods/, one file each
from .analysis import AttentionSite, GraphAnalysis, LinearOp, MLPSite, SkippedRegion, analyze
from .backend import PassError, SparseWarning, StrictError, sparse_backend
from .compress import compress_context
from .explain import explain
from .export import export
from .methods.d2prune import D2PruneConfig
from .methods.dapq import DapQConfig
from .methods.evit import EViTConfig
from .methods.flap import FLAPConfig
from .methods.defensivekv import DefensiveKVConfig
from .methods.expected_attention import ExpectedAttentionConfig
from .methods.h2o import H2OConfig
from .methods.hitkv import HitKVConfig
from .methods.keydiff import KeyDiffConfig
from .methods.knorm import KnormConfig
from .methods.kvzip import KVzipConfig
from .methods.lazyllm import LazyLLMConfig
from .methods.magnitude import MagnitudeConfig
from .methods.nm import NMSparsityConfig
from .methods.plan import PlanConfig
from .methods.pyramidkv import PyramidKVConfig
from .methods.snapkv import SnapKVConfig
from .methods.streaming_llm import StreamingLLMConfig
from .methods.taylor import TaylorConfig
from .methods.tome import ToMeConfig
from .methods.tova import TOVAConfig
from .methods.wanda import WandaConfig
from .options import SparseOptions, parse_options
from .plan import Plan
from .recipes import RECIPES
from .report import Report
from .transform import transform

__all__ = [
    "AttentionSite", "GraphAnalysis", "LinearOp", "MLPSite", "PassError", "RECIPES", "Report", "SkippedRegion",
    "SparseOptions", "SparseWarning", "StrictError", "analyze", "compress_context", "explain", "export", "parse_options",
    "sparse_backend", "transform",
    # KV-cache eviction configs (options={"kv": H2OConfig(compression_ratio=0.75)})
    "DapQConfig", "DefensiveKVConfig", "ExpectedAttentionConfig", "H2OConfig", "HitKVConfig", "KeyDiffConfig",
    "KnormConfig", "KVzipConfig", "PyramidKVConfig", "SnapKVConfig", "StreamingLLMConfig", "TOVAConfig",
    # token reduction configs (options={"tokens": LazyLLMConfig(layers=[4], keep_ratios=[0.5])})
    "EViTConfig", "LazyLLMConfig", "ToMeConfig",
    # pruning configs (options={"prune": WandaConfig(mlp_ratio=0.2, calibration=batches)}) and plans
    "D2PruneConfig", "FLAPConfig", "MagnitudeConfig", "NMSparsityConfig", "Plan", "PlanConfig", "TaylorConfig",
    "WandaConfig",
]
__version__ = "0.1.0"


if "transformers" in sys.modules:  # HF's StaticCache buffers may shrink (compile_sparse.cache)
    cache.install()
