"""Structured-pruning speed on CPU, SmolLM2, Inductor on every side, one process (docs/evaluation.md, "Speed").

A 1024-token prefill (no cache) of the model compiled with ``{"prune": {"method": "magnitude",
"mlp_ratio": R}}`` against (1) the unpruned model and (2) the ideal: a plain model whose Linear
modules are built at the pruned width (compile_sparse.export.shrink_model, the same weights),
both compiled with backend="inductor". The criterion does not matter for speed; magnitude needs no
calibration. Rounds interleave the three, so drift hits all alike.

    OMP_NUM_THREADS=1 .venv/bin/python bench/prune_speed.py --json docs/data/prune_speed.json
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from compile_sparse import models
from compile_sparse.export import shrink_model
from compile_sparse.plan import Plan
from compile_sparse.progress import progress


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mlp-ratio", type=float, default=0.4)
    parser.add_argument("--head-ratio", type=float, default=0.0)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model, tokenizer = models.load("smollm2")
    ids = tokenizer(models.sotu_documents("test", 1)[0][1], return_tensors="pt").input_ids[:, :args.tokens]
    plan_path = Path("/tmp/compile_sparse_prune_speed_plan.json")
    prune = {"method": "magnitude", "mlp_ratio": args.mlp_ratio, "head_ratio": args.head_ratio,
             "save_plan": str(plan_path)}
    variants = {"dense": torch.compile(model, backend="inductor"),
                "pruned": torch.compile(model, backend="sparse", options={"prune": prune})}
    with torch.no_grad():
        first = {}
        for name, fn in variants.items():
            start = time.perf_counter()
            first[name] = fn(ids, use_cache=False).logits
            print(f"{name}: compiled and ran in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        ideal_model = shrink_model(copy.deepcopy(model), Plan.load(plan_path))
        variants["ideal"] = torch.compile(ideal_model, backend="inductor")
        start = time.perf_counter()
        first["ideal"] = variants["ideal"](ids, use_cache=False).logits
        print(f"ideal: compiled and ran in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        max_diff = (first["pruned"] - first["ideal"]).abs().max().item()
        times = {name: [] for name in variants}
        for r in progress(range(args.rounds + 1), desc="rounds", unit="round"):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn(ids, use_cache=False)
                if r:  # round 0 warms up
                    times[name].append((time.perf_counter() - start) * 1e3)
    ms = {name: statistics.median(t) for name, t in times.items()}
    out = {"model": "smollm2", "tokens": args.tokens, "options": {"prune": {k: v for k, v in prune.items() if k != "save_plan"}},
           "threads": torch.get_num_threads(), "rounds": args.rounds,
           "prefill_ms": ms, "pruned_vs_ideal_speed": ms["ideal"] / ms["pruned"],
           "speedup_over_dense": ms["dense"] / ms["pruned"], "ideal_speedup_over_dense": ms["dense"] / ms["ideal"],
           "max_logit_diff_pruned_vs_ideal": max_diff, "command": shlex.join(sys.argv)}
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
