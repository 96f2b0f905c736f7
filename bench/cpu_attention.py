"""One layer's prefill attention on CPU: SDPA against ``kv_attention_totals`` (the attention with
H2O's and HitKV's per-key totals), the native kernel (codegen/cpu.py) and the torch chunks it
replaced, timed in turn, medians. Shapes: SmolLM2-135M's (9 query heads, 3 KV heads, head dim 64).

    OMP_NUM_THREADS=1 .venv/bin/python bench/cpu_attention.py --tokens 4096 --rounds 7
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time

import torch

from compile_sparse.codegen import cpu
from compile_sparse.methods.h2o import H2OConfig
from compile_sparse.methods.hitkv import HitKVConfig
from compile_sparse.passes.kv.prefill import attention_totals_torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not cpu.available():
        sys.exit("the native CPU kernel could not be built here (see the warning)")
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, args.heads, args.tokens, args.dim, generator=gen)  # (1, Hq, T, D)
    k, v = (torch.randn(1, args.kv_heads, args.tokens, args.dim, generator=gen) for _ in range(2))  # (1, Hkv, T, D)
    scale = args.dim ** -0.5
    h2o, hitkv = H2OConfig(compression_ratio=0.75), HitKVConfig(compression_ratio=0.75)
    sides = {
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "native h2o": lambda: cpu.attention_totals(q, k, v, None, scale, None, h2o.native_per_query()),
        "native hitkv": lambda: cpu.attention_totals(q, k, v, None, scale, None, hitkv.native_per_query()),
        "torch h2o": lambda: attention_totals_torch(q, k, v, None, scale, None, h2o),
        "torch hitkv": lambda: attention_totals_torch(q, k, v, None, scale, None, hitkv),
    }
    times: dict[str, list[float]] = {name: [] for name in sides}
    for run in sides.values():  # warm-up
        run()
    for _ in range(args.rounds):
        for name, run in sides.items():
            start = time.perf_counter()
            run()
            times[name].append(1000 * (time.perf_counter() - start))
    sdpa = statistics.median(times["sdpa"])
    rows = []
    for name, values in times.items():
        median = statistics.median(values)
        quartiles = statistics.quantiles(values, n=4)
        rows.append({"side": name, "ms": median, "vs_sdpa": median / sdpa, "spread": (quartiles[2] - quartiles[0]) / median})
        print(f"{name:>13}: {median:7.0f} ms  {median / sdpa:.2f}x SDPA  (spread {rows[-1]['spread']:.0%})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": shlex.join(sys.argv), "tokens": args.tokens, "heads": args.heads,
                       "kv_heads": args.kv_heads, "dim": args.dim, "rounds": args.rounds, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
