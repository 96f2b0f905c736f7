"""Decoder token dropping speed on CPU: a SmolLM2 prefill with LazyLLM-style pruning against the
dense prefill, both through Inductor, one process (docs/evaluation.md, "Speed"), last position's logits only
on both sides (``logits_to_keep=1``).

    OMP_NUM_THREADS=1 .venv/bin/python bench/token_speed.py --json docs/data/token_speed.json

The FLOP bound of a schedule is the dense prefill's FLOPs over the pruned one's, counting the
projections and MLPs (linear in tokens) and causal attention (quadratic) per layer.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

import torch
from token_quality import parse_schedule

from compile_sparse import models
from compile_sparse.passes.tokens.schedule import per_layer
from compile_sparse.timing import median_ms


def flop_bound(model, length: int, layers: list[int], keeps: list[float]) -> float:
    """Dense prefill FLOPs / pruned prefill FLOPs (matmuls only)."""
    config = model.config
    hidden, inter, heads = config.hidden_size, config.intermediate_size, config.num_attention_heads
    head_dim = hidden // heads
    kv = config.num_key_value_heads * head_dim
    per_token = 2 * (hidden * (2 * hidden + 2 * kv) + 3 * hidden * inter)  # q, o, k, v and the gated MLP

    def layer_flops(tokens: int) -> float:
        return tokens * per_token + 2 * 2 * heads * head_dim * tokens * (tokens + 1) / 2  # causal QK^T and PV

    kept = per_layer(layers, [max(1, round(length * keep)) for keep in keeps], length, config.num_hidden_layers)
    return sum(layer_flops(length) for _ in kept) / sum(layer_flops(k) for k in kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", nargs="*", default=["4:0.5"])
    parser.add_argument("--length", type=int, default=1024, help="prompt tokens")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = models.load("smollm2")
    ids = models.sotu_ids(tokenizer, args.length)  # (1, length)
    rows = []
    with torch.no_grad():
        torch.compiler.reset()
        dense = torch.compile(model.forward, backend="inductor")
        dense_ms = median_ms(lambda: dense(input_ids=ids, use_cache=True, logits_to_keep=1), args.runs)
        print(f"dense prefill of {args.length} tokens: {dense_ms:.1f} ms", flush=True)
        for schedule in args.schedules:
            layers, keeps = parse_schedule(schedule)
            options = {"tokens": {"method": "lazyllm", "layers": layers, "keep_ratios": keeps}}
            torch.compiler.reset()
            sparse = torch.compile(model.forward, backend="sparse", options=options)
            cache = sparse(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
            cached = [layer.keys.shape[-2] for layer in cache.layers]
            sparse_ms = median_ms(lambda: sparse(input_ids=ids, use_cache=True, logits_to_keep=1), args.runs)
            # dense again, right after: the two sides are measured in one stretch of the same process
            torch.compiler.reset()
            dense = torch.compile(model.forward, backend="inductor")
            dense_again = median_ms(lambda: dense(input_ids=ids, use_cache=True, logits_to_keep=1), args.runs)
            row = {"schedule": schedule, "options": options, "length": args.length, "dense_ms": min(dense_ms, dense_again),
                   "dense_ms_runs": [dense_ms, dense_again], "sparse_ms": sparse_ms,
                   "speedup": min(dense_ms, dense_again) / sparse_ms,
                   "flop_bound": flop_bound(model, args.length, layers, keeps), "cache_tokens": cached}
            rows.append(row)
            print(f"lazyllm {schedule}: {sparse_ms:.1f} ms, {row['speedup']:.2f}x faster than dense "
                  f"(FLOP bound {row['flop_bound']:.2f}x); cache tokens per layer {cached[0]}..{cached[-1]}", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"model": "smollm2", "rows": rows, "command": shlex.join(sys.argv),
                               "threads": torch.get_num_threads()}, f, indent=1)


if __name__ == "__main__":
    main()
