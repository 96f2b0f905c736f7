"""KV-eviction speed on CPU, SmolLM2, Inductor on every side, one process (compile_sparse.benchmark).

Decode: one step at a ``--context``-token prompt compressed at ``--ratio`` (4096 -> 1024 at 0.75),
against the dense model over the full cache and over the ideal (a plain cache as long as the
compressed one), the three timed in turn round after round, the ratios taken round by round. Batch 8
repeats the batch-1 caches (and the state the backend keeps for them) along the batch. Prefill: the
prompt through every method against the dense prefill, timed in turn.

    OMP_NUM_THREADS=1 .venv/bin/python bench/kv_speed.py --json docs/data/kv_speed.json

``--params`` adds parameters to every method (``'{"head_budgets": "adaptive"}'``: per-head budgets,
a packed cache).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

import torch

from compile_sparse import benchmark, models
from compile_sparse.timing import prefill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=["streaming_llm", "tova", "h2o", "hitkv"])
    parser.add_argument("--prefill-methods", nargs="*", default=["streaming_llm", "snapkv", "tova", "knorm", "h2o",
                                                                 "hitkv", "pyramidkv"])
    parser.add_argument("--ratio", type=float, default=0.75)
    parser.add_argument("--context", type=int, default=4096, help="prompt tokens")
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 8])
    parser.add_argument("--rounds", type=int, default=15, help="decode rounds (every side once a round, in turn)")
    parser.add_argument("--prefill-rounds", type=int, default=3)
    parser.add_argument("--params", default="{}", help="parameters every method takes as well, as JSON "
                        "(per-head budgets: '{\"head_budgets\": \"adaptive\"}')")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = models.load("smollm2")
    ids = models.sotu_ids(tokenizer, args.context)  # (1, context)
    out: dict = {"model": "smollm2", "device": "cpu, 1 thread", "command": shlex.join(sys.argv), "decode": [],
                 "prefill": []}

    def save() -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)

    with torch.no_grad():
        dense_cache = None  # the dense prefill's cache serves every method
        for method in args.methods:
            options = {"kv": {"method": method, "compression_ratio": args.ratio, **json.loads(args.params)}}
            torch.compiler.reset()
            dense, sparse = benchmark.compiled(model, options)
            if dense_cache is None:
                dense_cache = prefill(dense, ids)().past_key_values
            sparse_cache = prefill(sparse, ids)().past_key_values
            for batch in args.batches:
                row = {"method": method, "ratio": args.ratio, "context": args.context,
                       **benchmark.decode_times(dense, sparse, dense_cache, sparse_cache, args.context, args.rounds, batch)}
                out["decode"].append(row)
                save()
                print(f"decode batch {batch} {method:>14}: dense {row['dense_ms']:.1f} ms, ideal {row['ideal_ms']:.1f} ms, "
                      f"sparse {row['sparse_ms']:.1f} ms -> {row['vs_ideal']:.3f}x the ideal round by round (spread "
                      f"{row['ratio_spread']['vs_ideal']:.1%}), {row['speedup']:.2f}x faster than dense", flush=True)
        for method in args.prefill_methods:
            options = {"kv": {"method": method, "compression_ratio": args.ratio, **json.loads(args.params)}}
            torch.compiler.reset()
            dense, sparse = benchmark.compiled(model, options)
            row = {"method": method, "tokens": args.context, **benchmark.prefill_times(dense, sparse, ids, args.prefill_rounds)}
            row["overhead"] = row["sparse_ms"] / row["dense_ms"] - 1
            out["prefill"].append(row)
            save()
            print(f"prefill {args.context} {method:>14}: dense {row['dense_ms']:.0f} ms, sparse {row['sparse_ms']:.0f} ms "
                  f"({1 / row['speedup']:.3f}x round by round)", flush=True)
    save()


if __name__ == "__main__":
    main()
