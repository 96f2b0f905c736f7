"""The named recipes (compile_sparse.options.RECIPES) on SmolLM2: quality (ctx-continuation), memory
(KV cache after the prefill) and speed (1024-token prefill and one decode step after it), each
against dense, in one process.

    OMP_NUM_THREADS=1 .venv/bin/python bench/recipes.py --json docs/data/recipes.json
    .venv/bin/python bench/recipes.py --tables docs/data/recipes_*.json     # the table for docs/results.md

Quality runs with lowering "eager" (the same rewritten graph); a recipe with token dropping leaves
caches whose layers differ in length, so its continuation goes one token at a time. Recipes that
prune with a data-reading criterion get the calibration speeches (docs/evaluation.md), 8 x 1024 tokens. Speed
compiles both sides with Inductor: the prefill with ``logits_to_keep=1``, then one decode step at
position 1024 over the cache that prefill left (dense: 1024 tokens per layer).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

import torch

from compile_sparse import eval as ev
from compile_sparse import benchmark
from compile_sparse.timing import prefill
from compile_sparse.options import RECIPES


def table(paths: list[str]) -> str:
    """One row per recipe from any mix of quality and speed runs."""
    rows: dict[str, dict] = {}
    for path in paths:
        for row in json.load(open(path))["rows"]:
            rows.setdefault(row["recipe"], {}).update(row)
    lines = ["| recipe | ctx-continuation ppl ratio | KV saved | KV cache (MB, 1024 tokens) | prefill speedup | "
             "decode step speedup |", "|---|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        speed = "sparse" in row
        lines.append(f"| {name} | {row['ppl_ratio']:.4f} | " + (
            f"{row['kv_saving']:.0%} | {row['dense']['kv_bytes'] / 1e6:.1f} -> {row['sparse']['kv_bytes'] / 1e6:.1f} | "
            f"{row['prefill_speedup']:.2f}x ({row['dense']['prefill_ms']:.0f} -> {row['sparse']['prefill_ms']:.0f} ms) | "
            f"{row['decode_speedup']:.2f}x ({row['dense']['decode_ms']:.1f} -> {row['sparse']['decode_ms']:.1f} ms) |"
            if speed else "— | — | — | — |"))
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["--tables"]:
        print(table(sys.argv[2:]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="*", default=[r for r in RECIPES if r != "dense"])
    parser.add_argument("--docs", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--no-quality", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    model, tokenizer, docs, dense_ppl = ev.smollm2_documents(args.docs)
    ids = next(iter(docs.values()))[:, :ev.CONTEXT]  # (1, 1024): the speed prompt
    rows = []
    for recipe in args.recipes:
        options = ev.with_calibration({"recipe": recipe}, tokenizer)
        uneven = "tokens" in RECIPES[recipe]
        row = {"recipe": recipe, "options": RECIPES[recipe]}
        if not args.no_quality:
            torch.compiler.reset()
            compiled = ev.compiled_forward(model, {**options, "lowering": "eager"})
            result = ev.ctx_continuation(recipe, ev.model_prefill(compiled), ev.model_forward(compiled), docs, dense_ppl,
                                         one_token_at_a_time=uneven)
            row.update(ppl_ratio=result.ppl_ratio, ppl=result.ppl)
            print(f"{recipe:>18}: ppl ratio {result.ppl_ratio:.4f}", flush=True)
        if not args.no_speed:  # Inductor on both sides, timed in turn (compile_sparse.benchmark)
            torch.compiler.reset()
            with torch.no_grad():
                dense, sparse = benchmark.compiled(model, options)
                row["prefill"] = benchmark.prefill_times(dense, sparse, ids, args.runs)
                decode = benchmark.decode_times(dense, sparse, prefill(dense, ids)().past_key_values,
                                                prefill(sparse, ids)().past_key_values, ids.shape[1], args.runs)
            row.update(decode=decode, prefill_speedup=row["prefill"]["speedup"], decode_speedup=decode["speedup"],
                       kv_saving=1 - decode["kv_bytes_sparse"] / decode["kv_bytes_dense"])
            print(f"{recipe:>18}: prefill {row['prefill_speedup']:.2f}x, decode {row['decode_speedup']:.2f}x, "
                  f"KV {row['kv_saving']:.0%} saved", flush=True)
        rows.append(row)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"model": "smollm2", "rows": rows, "command": shlex.join(sys.argv),
                           "seconds": round(time.perf_counter() - start)}, f, indent=1)


if __name__ == "__main__":
    main()
