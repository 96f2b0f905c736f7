"""The KV decode step called as one subgraph by every layer (Inductor lowers it once) against the
step inlined in every layer (lowered 30 times), SmolLM2 on CPU, one process: decode-step times of
the two compiled models, timed in turn round after round (compile_sparse.timing.interleaved).
The inlined side is the same backend with ``call_compiled_once`` replaced by a plain call while it
compiles.

    OMP_NUM_THREADS=1 .venv/bin/python bench/decode_subgraph.py --json docs/data/decode_subgraph.json
    OMP_NUM_THREADS=1 .venv/bin/python bench/decode_subgraph.py --methods h2o --params '{"head_budgets": "adaptive"}' \
        --json docs/data/decode_subgraph_packed.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

import torch

from compile_sparse import models
from compile_sparse.passes.kv import rewrite
from compile_sparse.timing import decode_step, interleaved, prefill


def inline_call(gm, fn, args, kwargs, name):
    """``call_compiled_once`` as it was before: the step traced into every layer."""
    return gm.graph.call_function(fn, tuple(args), kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=["tova", "h2o", "hitkv", "streaming_llm"])
    parser.add_argument("--ratio", type=float, default=0.75)
    parser.add_argument("--context", type=int, default=1024, help="prompt tokens")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--params", default="{}", help='parameters every method takes as well, as JSON '
                        '(e.g. \'{"head_budgets": "adaptive"}\': the packed step)')
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    params = json.loads(args.params)
    torch.set_num_threads(1)
    model, tokenizer = models.load("smollm2")
    ids = models.sotu_ids(tokenizer, args.context)  # (1, context)
    out: dict = {"model": "smollm2", "device": "cpu, 1 thread", "command": shlex.join(sys.argv), "rows": []}
    subgraph_call = rewrite.call_compiled_once
    with torch.no_grad():
        for method in args.methods:
            torch.compiler.reset()
            steps, compile_s = {}, {}

            def subgraph_forward(*a, **k):  # a code object per side: Dynamo keeps compiled graphs per code object
                return model.forward(*a, **k)

            def inline_forward(*a, **k):
                return model.forward(*a, **k)

            for side, call, forward in (("subgraph", subgraph_call, subgraph_forward),
                                        ("inline", inline_call, inline_forward)):
                rewrite.call_compiled_once = call
                compiled = torch.compile(forward, backend="sparse",
                                         options={"kv": {"method": method, "compression_ratio": args.ratio, **params}})
                cache = prefill(compiled, ids)().past_key_values
                steps[side] = decode_step(compiled, cache, 1, args.context)
                start = time.perf_counter()
                steps[side]()  # the step's compile
                compile_s[side] = time.perf_counter() - start
            rewrite.call_compiled_once = subgraph_call
            times = interleaved(steps, args.rounds, warmup=2, desc=f"{method} decode")
            row = {"method": method, "ratio": args.ratio, "params": params, "context": args.context, "first_step_s": compile_s,
                   **{f"{side}_{key}": value for side, summary in times.items() for key, value in summary.items()},
                   "subgraph_over_inline": times["subgraph"]["median_ms"] / times["inline"]["median_ms"]}
            out["rows"].append(row)
            print(f"{method:>14}: subgraph {row['subgraph_median_ms']:.2f} ms (spread {row['subgraph_spread']:.3f}), "
                  f"inline {row['inline_median_ms']:.2f} ms (spread {row['inline_spread']:.3f}): "
                  f"{row['subgraph_over_inline']:.3f}x; first step {compile_s['subgraph']:.0f} s / {compile_s['inline']:.0f} s",
                  flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
