"""Named presets of ``options``, measured on SmolLM2-135M in docs/results.md ("Recipes") with the
command that measured them; ctx-continuation ppl ratios to dense in the comments. A leaf module."""

from __future__ import annotations

from typing import Any

RECIPES: dict[str, dict[str, Any]] = {
    # No compression: the analysis runs, nothing is rewritten, outputs equal eager.
    "dense": {},
    # H2O keeping half of the prompt's KV cache: 1.0088; single-needle retrieval 1/50 (dense 49/50).
    "kv-near-lossless": {"kv": {"method": "h2o", "compression_ratio": 0.5}},
    # The default, chosen on both protocols: TOVA per KV head, pooled over 15 positions, keeping
    # half: 1.0193, and single-needle retrieval 48/50 (dense 49/50).
    "kv-balanced": {"kv": {"method": "tova", "compression_ratio": 0.5, "kernel_size": 15, "per_head": True}},
    # H2O keeping a quarter: 1.0191, the largest KV saving within 2% of dense on continuation, but
    # it forgets a fact stated once: single-needle retrieval 0/50. For text that is continued.
    "kv-continuation": {"kv": {"method": "h2o", "compression_ratio": 0.75}},
    # For prompts that will be asked about: the default's scorer keeping a quarter: single-needle
    # retrieval 48/50 for 1.0530.
    "kv-retrieval": {"kv": {"method": "tova", "compression_ratio": 0.75, "kernel_size": 15, "per_head": True}},
    # FLAP removing 20% of the MLP neurons (standardized allocation; pass "calibration" batches).
    "prune-mlp20": {"prune": {"method": "flap", "mlp_ratio": 0.2, "allocation": "standardized"}},
    # All three families in one compile: FLAP MLP 20%, LazyLLM 50% from layer 4, H2O at 0.5.
    "composed": {"prune": {"method": "flap", "mlp_ratio": 0.2, "allocation": "standardized"},
                 "tokens": {"method": "lazyllm", "layers": [4], "keep_ratios": [0.5]},
                 "kv": {"method": "h2o", "compression_ratio": 0.5}},
}
DEFAULT_RECIPE = "kv-balanced"
