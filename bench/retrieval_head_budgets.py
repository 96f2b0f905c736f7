"""Per-head and per-layer budgets (AdaKV's and Layer-DefensiveKV's allocations) against uniform
heads, same bytes, on the retrieval protocol's single-needle cases, before a packed per-head cache
is built for them.

    OMP_NUM_THREADS=1 .venv/bin/python bench/retrieval_head_budgets.py --first-case 100 --cases 30 \
        --ratios 0.9 0.95 --floors 0.2 0.5 [--shares heads layers layer-budgets] [--scorer '{"method": "snapkv"}']

Scorer: any registered KV method's ``score`` (``--scorer``, its options as JSON; default the
per-head pooled TOVA, ``{"method": "tova", "kernel_size": 15, "per_head": true}``: the last prompt
query's attention, mean over each KV head's group), on the dense prefill's queries and keys of
each layer. Uniform: each KV head keeps its top ``budget`` tokens. Per-head (AdaKV): each head
keeps its top ``floor * budget`` tokens, then the layer's other ``Hkv * budget * (1 - floor)``
slots go to the highest scores of any head (``--shares heads``); ``layers``: the slots of every
layer go to the highest scores of any head of any layer (budgets per layer and per head: one
reading of Layer-DefensiveKV's layer-wise allocation, and KVzip's); ``layer-budgets``: each layer
the slots ``layers`` gives it, split evenly among its heads (``compile_sparse.retrieval.allocate``).
Evaluated masked (kvpress's way: every key stays in the
cache, the attention of each head hides its evicted ones), so both sides hold the same number of
real tokens; the answer is decoded greedily after the dense prompt's logits, as the retrieval
replay does.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from compile_sparse import models, retrieval
from compile_sparse.options import parse_options
from compile_sparse.passes.kv.scoring import ScoreInputs

TOVA = {"method": "tova", "kernel_size": 15, "per_head": True}


def scores(config, site: retrieval.Site, length: int, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """The method's scores of one layer's prompt tokens: (1, Hkv, T). ``rope``: RoPE's (cos, sin)
    tables (1, T, D) of the prompt, for the methods that read them."""
    b, hkv = site.key.shape[:2]
    positions = torch.arange(length, dtype=torch.float32).expand(b, hkv, length)  # (1, Hkv, T)
    inputs = ScoreInputs(site.query[:, :, :length], site.key[:, :, :length], site.scale, positions,
                         positions[:, 0], softcap=site.softcap, values=site.value[:, :, :length],
                         rope=rope if config.READS_ROPE else None)
    return config.score(inputs)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first-case", type=int, default=100)
    parser.add_argument("--cases", type=int, default=30)
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.9, 0.95])
    parser.add_argument("--floors", nargs="+", type=float, default=[0.2, 0.5])
    parser.add_argument("--shares", nargs="+", choices=retrieval.SHARES[1:], default=["heads"])
    parser.add_argument("--scorer", default=json.dumps(TOVA), help="the scoring KV method's options as JSON")
    args = parser.parse_args()
    config = parse_options({"kv": json.loads(args.scorer)}).methods["kv"]
    model, tokenizer = models.load("smollm2")
    cases = retrieval.make_cases(tokenizer, ("single_needle",), count=args.cases, first=args.first_case)
    answer = retrieval.Answerer(tokenizer)
    right = {"dense": 0}
    start = time.perf_counter()
    with torch.no_grad():
        for i, case in enumerate(cases):
            length = case.prompt.shape[1]
            captured = retrieval.capture(model, case.prompt)
            cache = retrieval.dense_cache(model, captured, length)
            right["dense"] += retrieval.is_correct(answer(model, case, "query-aware", cache, captured.logits), case.answers)
            layer_scores = [scores(config, site, length, captured.rope) for site in captured.sites]
            for ratio in args.ratios:
                budget = int(length * (1 - ratio))
                rules = {"uniform": retrieval.allocate(layer_scores, budget)}
                rules.update({f"{share} floor {f}": retrieval.allocate(layer_scores, budget, share, f)
                              for share in args.shares for f in args.floors})
                for name, kept in rules.items():
                    assert sum(int(k.sum()) for k in kept) == len(kept) * kept[0].shape[1] * budget  # same bytes
                    cache = retrieval.dense_cache(model, captured, length)
                    with retrieval.masked(model, kept):
                        text = answer(model, case, "query-aware", cache, captured.logits)
                    key = f"{name} @{ratio}"
                    right[key] = right.get(key, 0) + retrieval.is_correct(text, case.answers)
            print(i + 1, round(time.perf_counter() - start), right, flush=True)
    print(json.dumps({"cases": args.cases, "first_case": args.first_case, "scorer": str(config), "right": right}))


if __name__ == "__main__":
    main()
