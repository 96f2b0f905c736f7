"""Named presets of ``options``, measured on SmolLM2-135M in docs/results.md ("Recipes") with the
command that measured them; ctx-continuation ppl ratios to dense in the comments. A leaf module."""

from __future__ import annotations

from typing import Any

RECIPES: dict[str, dict[str, Any]] = {
    # No compression: the analysis runs, nothing is rewritten, outputs equal eager.
    "dense": {},
    # H2O keeping half of the prompt's KV cache: 1.0088.
    "kv-near-lossless": {"kv": {"method": "h2o", "compression_ratio": 0.5}},
    # H2O keeping a quarter: 1.0191, the largest KV saving measured within 2% of dense: the default.
    # It forgets a fact stated once: single-needle retrieval at 2048 tokens 0/50 (dense 49/50).
    "kv-balanced": {"kv": {"method": "h2o", "compression_ratio": 0.75}},
    # For prompts that will be asked about: TOVA with its scores pooled over 15 neighbouring
    # positions, keeping half: single-needle retrieval 49/50 (dense 49/50).
    "kv-retrieval": {"kv": {"method": "tova", "compression_ratio": 0.5, "kernel_size": 15}},
    # FLAP removing 20% of the MLP neurons (standardized allocation; pass "calibration" batches).
    "prune-mlp20": {"prune": {"method": "flap", "mlp_ratio": 0.2, "allocation": "standardized"}},
    # All three families in one compile: FLAP MLP 20%, LazyLLM 50% from layer 4, H2O at 0.5.
    "composed": {"prune": {"method": "flap", "mlp_ratio": 0.2, "allocation": "standardized"},
                 "tokens": {"method": "lazyllm", "layers": [4], "keep_ratios": [0.5]},
                 "kv": {"method": "h2o", "compression_ratio": 0.5}},
}
DEFAULT_RECIPE = "kv-balanced"
