"""KV-eviction speed on CPU, SmolLM2, Inductor on every side, one process (EVAL.md "Speed").

Decode: one step at a 4096-token context compressed at ``--ratio`` (cache 1024 tokens at 0.75),
against the same model compiled dense over the 4096-token cache and over a plain cache as long as
the compressed one (the ideal). Prefill: a 1024-token prefill with scoring and eviction against
the dense compiled prefill (the scoring overhead).

    OMP_NUM_THREADS=1 .venv/bin/python bench/kv_speed.py --json docs/data/kv_speed.json

Batch 8 decode reuses the batch-1 prefill, repeated along the batch (a 4096-token prefill at batch 8
takes minutes on one core), so it runs the stateless methods only: a stateful method's scores
belong to the batch-1 cache.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

import torch

from compile_sparse import models
from compile_sparse.passes.kv.budgets import uniform_budget
from compile_sparse.timing import decode_step_ms, median_ms, repeat_cache, slice_cache

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=["streaming_llm", "tova", "h2o", "hitkv"])
    parser.add_argument("--prefill-methods", nargs="*", default=["streaming_llm", "snapkv", "tova", "h2o", "hitkv"])
    parser.add_argument("--ratio", type=float, default=0.75)
    parser.add_argument("--context", type=int, default=4096, help="decode context (tokens prefilled)")
    parser.add_argument("--prefill", type=int, default=1024, help="tokens of the timed prefill")
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 8])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = models.load("smollm2")
    ids = models.sotu_ids(tokenizer, args.context)  # (1, context)
    kept = uniform_budget(args.context, args.ratio)
    dense = torch.compile(model.forward, backend="inductor")
    rows = {"decode": [], "prefill": []}

    def say(line: str) -> None:
        print(line, flush=True)

    with torch.no_grad():
        dense_cache = model(input_ids=ids, use_cache=True).past_key_values  # eager prefill: only the cache matters
        bytes_per_token = sum(2 * layer.keys[0, :, :1].numel() * layer.keys.element_size() for layer in dense_cache.layers)
        compressed = {}
        for method in args.methods:  # the prefill is not timed here: lowered eagerly, to save compile time
            kv = {"method": method, "compression_ratio": args.ratio}
            prefill = torch.compile(model.forward, backend="sparse", options={"kv": kv, "lowering": "eager"})
            compressed[method] = (kv, prefill(input_ids=ids, use_cache=True).past_key_values)
            say(f"prefilled {method}: cache {compressed[method][1].layers[0].keys.shape[-2]} tokens")
        for batch in args.batches:
            torch.compiler.reset()  # every measurement compiles afresh: static shapes on every side
            dense_ms = decode_step_ms(dense, repeat_cache(dense_cache, batch), batch, args.context, args.runs)
            torch.compiler.reset()
            ideal_cache = repeat_cache(slice_cache(dense_cache, args.context - kept), batch)
            ideal_ms = decode_step_ms(dense, ideal_cache, batch, args.context, args.runs)
            for method, (kv, cache) in compressed.items():
                if batch > 1 and method in ("h2o", "hitkv"):
                    continue
                cache = cache if batch == 1 else repeat_cache(cache, batch)
                torch.compiler.reset()
                sparse = torch.compile(model.forward, backend="sparse", options={"kv": kv})  # Inductor
                sparse_ms = decode_step_ms(sparse, cache, batch, args.context, args.runs)
                assert cache.layers[0].keys.shape[-2] == kept, "decode must hold the budget"
                row = {"method": method, "batch": batch, "context": args.context, "ratio": args.ratio, "kept": kept,
                       "kv_bytes_dense": bytes_per_token * args.context * batch,
                       "kv_bytes_sparse": bytes_per_token * kept * batch,
                       "dense_ms": dense_ms, "ideal_ms": ideal_ms, "sparse_ms": sparse_ms,
                       "vs_ideal": sparse_ms / ideal_ms, "speedup": dense_ms / sparse_ms}
                rows["decode"].append(row)
                say(f"decode batch {batch} {method:>14}: dense {dense_ms:.1f} ms, ideal {ideal_ms:.1f} ms, "
                    f"sparse {sparse_ms:.1f} ms -> {row['vs_ideal']:.3f}x ideal, {row['speedup']:.2f}x faster than dense")
        short = ids[:, :args.prefill]  # (1, prefill)
        torch.compiler.reset()
        dense_prefill_ms = median_ms(lambda: dense(input_ids=short, use_cache=True), max(3, args.runs // 2))
        for method in args.prefill_methods:
            torch.compiler.reset()
            sparse = torch.compile(model.forward, backend="sparse",
                                   options={"kv": {"method": method, "compression_ratio": args.ratio}})
            sparse_ms = median_ms(lambda: sparse(input_ids=short, use_cache=True), max(3, args.runs // 2))
            rows["prefill"].append({"method": method, "tokens": args.prefill, "dense_ms": dense_prefill_ms,
                                    "sparse_ms": sparse_ms, "overhead": sparse_ms / dense_prefill_ms - 1})
            say(f"prefill {args.prefill} {method:>14}: dense {dense_prefill_ms:.0f} ms, sparse {sparse_ms:.0f} ms "
                f"(+{sparse_ms / dense_prefill_ms - 1:.1%})")
    out = {"model": "smollm2", "device": "cpu, 1 thread", "command": shlex.join(sys.argv), **rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
