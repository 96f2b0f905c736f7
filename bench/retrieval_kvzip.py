"""KVzip's context reconstruction, replayed outside the compiled graph, on the retrieval protocol's
query-agnostic single-needle cases: what the method would keep, before building it (it is not a
registered method: docs/kv_eviction.md, "Limits").

    OMP_NUM_THREADS=1 .venv/bin/python bench/retrieval_kvzip.py --first-case 100 --cases 30 --ratios 0.5 0.75 0.9
    OMP_NUM_THREADS=1 .venv/bin/python bench/retrieval_kvzip.py --first-case 100 --cases 30 --ratios 0.75 0.9 \
        --rules truncate kvzip "kvzip, heads" "kvzip, global" "kvzip, layer budgets" "kvzip pooled 15" \
        "kvzip pooled 15, heads" "kvzip pooled 15, global" "kvzip pooled 15, layer budgets"

Per case: a dense prefill of the context (every layer's keys and values recorded), then the model
re-reads it over that cache, teacher-forced: a repeat prompt ("Repeat the previous context
exactly." in the chat template, the assistant's turn opened), then the context's text again, at
the positions after the context. A context key's score is the largest attention any of those
queries, and any query head of its KV group, pays it (KVzip, Kim et al. 2025; kvpress's
KVzipPress), optionally pooled over 15 positions as our TOVA is, and with ``--sinks N`` the context's
first N tokens kept in every head (kvpress's ``n_sink``). Beside it, on the same cases:
truncation (the last ``budget`` tokens) and the per-head pooled TOVA of the context's last query.

Allocations of the same number of kept keys, ``budget`` per KV head and layer on average:
uniform (each KV head keeps its top ``budget``: the rules without a comma), ``heads`` (a layer's
``Hkv * budget`` slots go to the highest scores of any of its heads: AdaKV's sharing, no floor),
``global`` (all layers' slots to the highest scores anywhere: KVzip's own allocation, kvpress's
default ``layerwise=False``) and ``layer budgets`` (each layer the slots ``global`` gives it,
split evenly among its heads: one length per layer, which a DynamicCache holds); see
``compile_sparse.retrieval.allocate``. Allocations of one length per layer decode over a cache of
the kept tokens; the others over the dense cache with each head's evicted context keys hidden from
its attention (kvpress's way of evaluating AdaKV), so every rule holds the same number of real
keys. The question is then fed over the cache and the answer decoded greedily, as ``compile-sparse
eval --setting query-agnostic`` does. Prints, per case, the share of the re-read's tokens the model predicted (it
does reconstruct the context when this is high).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from compile_sparse import models, retrieval
from compile_sparse.methods.tova import TOVAConfig
from compile_sparse.passes.kv.scoring import ScoreInputs, pool_scores
from compile_sparse.reference import grouped_probs

REREAD = "compile_sparse_kvzip_reread"
SCORES: dict[int, torch.Tensor] = {}  # layer -> (1, Hkv, C): each context key's largest attention
CONTEXT = {"length": 0}
TOVA = TOVAConfig(kernel_size=15, per_head=True)  # the default's scorer


def scoring_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA of the re-read's queries (1, H, n, D) over the context and the re-read so far (1, Hkv, C + n, D),
    causal from the bottom right; records each context key's largest attention over queries and group."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    n, total = query.shape[2], key.shape[2]
    visible = (torch.arange(total)[None, :] <= torch.arange(total - n, total)[:, None])[None, None]  # (1, 1, n, C + n)
    probs = grouped_probs(query, key, kwargs.get("scaling") or module.scaling,
                          visible.expand(1, key.shape[1], n, total))  # (1, Hkv, G, n, C + n)
    SCORES[module.layer_idx] = probs[..., :CONTEXT["length"]].amax(dim=(2, 3))  # (1, Hkv, C)
    return sdpa_attention_forward(module, query, key, value, visible, **kwargs)


RULES = ("truncate", "kvzip", "kvzip pooled 15", "tova per-head pooled", "kvzip, heads", "kvzip, global",
         "kvzip, layer budgets", "kvzip pooled 15, heads", "kvzip pooled 15, global", "kvzip pooled 15, layer budgets")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first-case", type=int, default=100)
    parser.add_argument("--cases", type=int, default=30)
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.75, 0.9])
    parser.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES[:4]))
    parser.add_argument("--sinks", type=int, default=0, help="KVzip keeps the context's first N tokens in every head "
                        "(kvpress's n_sink; 0: none)")
    args = parser.parse_args()
    from transformers import AttentionInterface

    AttentionInterface.register(REREAD, scoring_attention)
    model, tokenizer = models.load("smollm2")
    cases = retrieval.make_cases(tokenizer, ("single_needle",), count=args.cases, first=args.first_case)
    before, after = retrieval.chat_template_parts(tokenizer)
    repeat = tokenizer.encode("\n\nRepeat the previous context exactly." + after, add_special_tokens=False)
    header = len(tokenizer.encode(before, add_special_tokens=False))
    answer = retrieval.Answerer(tokenizer)
    right: dict[str, int] = {}
    start = time.perf_counter()
    with torch.no_grad():
        for i, case in enumerate(cases):
            length = case.context.shape[1]
            captured = retrieval.capture(model, case.context)
            ids = torch.tensor([repeat + case.context[0, header:].tolist()])  # (1, R + C - header)
            CONTEXT["length"] = length
            model.set_attn_implementation(REREAD)
            logits = model(input_ids=ids, past_key_values=retrieval.dense_cache(model, captured, length),
                           position_ids=torch.arange(length, length + ids.shape[1])[None], use_cache=True).logits
            model.set_attn_implementation("sdpa")
            copied = (logits[0, len(repeat) - 1:-1].argmax(-1) == ids[0, len(repeat):]).float().mean().item()
            kvzip = [SCORES[layer] for layer in range(len(captured.sites))]
            pooled = [pool_scores(s, 15) for s in kvzip]
            for s in kvzip + pooled:  # (1, Hkv, C): the sinks score above every key
                s[..., :args.sinks] = float("inf")
            positions = torch.arange(length, dtype=torch.float32).expand(1, captured.sites[0].key.shape[1], length)
            tova = [TOVA.score(ScoreInputs(s.query[:, :, :length], s.key[:, :, :length], s.scale, positions,
                                           positions[:, 0]))[0] for s in captured.sites]  # (1, Hkv, C) each
            recency = [positions.clone() for _ in captured.sites]
            scored = {"truncate": (recency, "none"), "kvzip": (kvzip, "none"), "kvzip pooled 15": (pooled, "none"),
                      "tova per-head pooled": (tova, "none")}
            for name, share in (("heads", "heads"), ("global", "layers"), ("layer budgets", "layer-budgets")):
                scored.update({f"kvzip, {name}": (kvzip, share), f"kvzip pooled 15, {name}": (pooled, share)})
            for ratio in args.ratios:
                budget = int(length * (1 - ratio))
                for name in args.rules:
                    layer_scores, share = scored[name]
                    kept = retrieval.allocate(layer_scores, budget, share)
                    assert sum(int(k.sum()) for k in kept) == len(kept) * kept[0].shape[1] * budget  # same bytes
                    if all(len(set(k.sum(-1).flatten().tolist())) == 1 for k in kept):  # one length per layer
                        cache = retrieval.kept_cache(model, captured, length, kept)
                        text = answer(model, case, "query-agnostic", cache, None)
                    else:
                        with retrieval.masked(model, kept):
                            cache = retrieval.dense_cache(model, captured, length)
                            text = answer(model, case, "query-agnostic", cache, None)
                    key = f"{name} @{ratio}"
                    right[key] = right.get(key, 0) + retrieval.is_correct(text, case.answers)
            print(i + 1, round(time.perf_counter() - start), f"copied {copied:.3f}", right, flush=True)
    print(json.dumps({"cases": args.cases, "first_case": args.first_case, "sinks": args.sinks, "right": right}))


if __name__ == "__main__":
    main()
