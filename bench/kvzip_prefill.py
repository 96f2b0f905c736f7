"""What KVzip's re-read costs: a context's compression through ``compile_sparse.compress_context``
(its prefill, then the re-read) against the dense prefill of the same context, and against the
prefill of the default recipe (which compresses inside the prefill), SmolLM2 on CPU, every side
compiled with Inductor in one process, timed in turn round after round
(compile_sparse.timing.interleaved).

    OMP_NUM_THREADS=1 .venv/bin/python bench/kvzip_prefill.py --json docs/data/kvzip_prefill.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

import torch

import compile_sparse
from compile_sparse import models
from compile_sparse.timing import interleaved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=2048, help="context tokens")
    parser.add_argument("--ratio", type=float, default=0.75)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = models.load("smollm2")
    ids = torch.randint(100, 40000, (1, args.context), generator=torch.Generator().manual_seed(0))  # (1, T)

    def compiled(options):
        return torch.compile(model.forward, backend="sparse", options=options)

    dense = torch.compile(model.forward)
    default = compiled({"recipe": "kv-balanced"})
    kvzip = compiled({"kv": {"method": "kvzip", "compression_ratio": args.ratio, "head_budgets": "adaptive",
                             "kernel_size": 15}})

    def prefill(forward):
        return lambda: forward(input_ids=ids, use_cache=True, logits_to_keep=1)

    sides = {"dense prefill": prefill(dense), "default recipe prefill": prefill(default),
             "kvzip compress_context": lambda: compile_sparse.compress_context(kvzip, tokenizer, ids)}
    with torch.no_grad():
        times = interleaved(sides, args.rounds, warmup=1)
    base = times["dense prefill"]["median_ms"]
    for name, t in times.items():
        print(f"{name:26s} {t['median_ms']:9.1f} ms  {t['median_ms'] / base:5.2f}x dense  spread {t['spread']:.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": shlex.join(["bench/kvzip_prefill.py", *sys.argv[1:]]), "context": args.context,
                       "ratio": args.ratio, "threads": 1, "times": times}, f, indent=1)


if __name__ == "__main__":
    main()
