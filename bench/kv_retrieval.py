"""kvpress 0.5.5's presses on the retrieval protocol's cases (compile_sparse.retrieval), beside ours.

    bash bench/setup_kvpress.sh
    OMP_NUM_THREADS=1 .venv/bin/python bench/kv_retrieval.py --presses tova expected_attention --ratios 0.75 0.9 \
        --tasks single_needle --json docs/data/kvpress_retrieval.json

Each press compresses inside its own prefill (``with press(model)``), as kvpress's pipeline does:
query-aware, the whole prompt; query-agnostic, the context, the question fed after it over the
compressed cache at its true positions. The answer is decoded greedily as for our methods
(``retrieval.Answerer``); ours come from ``compile-sparse eval smollm2 --protocol retrieval``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

import torch

from compile_sparse import models, retrieval
from compile_sparse.progress import progress

PRESSES = {"tova": "TOVAPress", "expected_attention": "ExpectedAttentionPress", "snapkv": "SnapKVPress",
           "keydiff": "KeyDiffPress", "knorm": "KnormPress", "observed_attention": "ObservedAttentionPress"}


def press_outcome(model, answer, cases, setting, name, ratio):
    import kvpress  # installed by bench/setup_kvpress.sh

    press = getattr(kvpress, PRESSES[name])(compression_ratio=ratio)
    # ObservedAttentionPress reads the attention weights: eager attention
    model.set_attn_implementation("eager" if name == "observed_attention" else "sdpa")
    outcome = retrieval.Outcome(f"kvpress:{name} {ratio}")
    for case in progress(cases, desc=f"kvpress {name} {ratio}", unit="case"):
        observed = retrieval.observed_length(case, setting)
        ids = case.prompt[:, :observed]  # (1, observed)
        with press(model):
            out = model(input_ids=ids, use_cache=True, cache_position=torch.arange(observed), logits_to_keep=1)
        kept = sum(layer.keys.shape[-2] for layer in out.past_key_values.layers) / (len(out.past_key_values.layers) * observed)
        outcome.add(case, answer(model, case, setting, out.past_key_values, out.logits[:, -1]), kept)
    model.set_attn_implementation("sdpa")
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presses", nargs="+", default=["tova", "expected_attention"], choices=PRESSES)
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.75, 0.9])
    parser.add_argument("--tasks", nargs="+", default=["single_needle"], choices=retrieval.TASKS)
    parser.add_argument("--length", type=int, default=retrieval.LENGTH)
    parser.add_argument("--cases", type=int, default=retrieval.CASES)
    parser.add_argument("--setting", default="query-aware", choices=retrieval.SETTINGS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    model, tokenizer = models.load("smollm2")
    cases = retrieval.make_cases(tokenizer, tuple(args.tasks), args.length, args.cases)
    answer = retrieval.Answerer(tokenizer)
    rows = []
    with torch.no_grad():
        for name in args.presses:
            for ratio in args.ratios:
                outcome = press_outcome(model, answer, cases, args.setting, name, ratio)
                rows.append({"method": f"kvpress:{name}", "ratio": ratio, "kv_removed": outcome.kv_removed,
                             "accuracy": outcome.accuracy, "tasks": outcome.tasks, "answers": outcome.texts})
                print(f"kvpress {name:>20} {ratio:.2f}  accuracy {outcome.accuracy:.3f} {outcome.tasks}", flush=True)
    out = {"model": "smollm2", "protocol": "retrieval", "setting": args.setting, "length": args.length,
           "cases": args.cases, "tasks": args.tasks, "rows": rows, "command": shlex.join(sys.argv),
           "seconds": round(time.perf_counter() - start)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print(f"done in {out['seconds']} s", file=sys.stderr)


if __name__ == "__main__":
    main()
