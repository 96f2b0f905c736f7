"""Compile the real SmolLM2-135M-Instruct with backend="sparse": what was found, what changed,
quality (perplexity on a State of the Union speech) and speed (prefill), against eager.

    python examples/demo_smollm2.py [--options JSON] [--tokens 512]
"""

import argparse
import json
import math
import statistics
import time

import torch

import compile_sparse
from compile_sparse import models


def perplexity(forward, ids: torch.Tensor) -> float:
    """ids: (1, T) -> exp(mean next-token cross entropy)."""
    with torch.no_grad():
        logits = forward(input_ids=ids, use_cache=False).logits  # (1, T, vocab)
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    return math.exp(loss.item())


def median_ms(forward, ids: torch.Tensor, runs: int = 5) -> float:
    times = []
    with torch.no_grad():
        for _ in range(runs):
            start = time.perf_counter()
            forward(input_ids=ids, use_cache=False)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--options", default=None, help="torch.compile options for the sparse backend, as JSON")
    parser.add_argument("--tokens", type=int, default=512, help="tokens of text to score and time")
    args = parser.parse_args()
    options = json.loads(args.options) if args.options else None
    torch.set_num_threads(1)  # stable timings on small machines

    model, tokenizer = models.load("smollm2")
    name, text = models.sotu_documents("test")[-1]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.tokens]  # (1, T)
    print(f"model: SmolLM2-135M-Instruct, text: {name}, {ids.shape[1]} tokens, options: {options or 'default'}\n")

    report = compile_sparse.explain(model, input_ids=ids, options=options)  # with a KV cache: KV bytes are counted
    print(report)
    print("\nwhat changed:", "; ".join(f"{p['family']}:{p['method']} {p['rewrites']}" for p in report.passes)
          or "nothing (no compression method in these options)")

    start = time.perf_counter()
    compiled = torch.compile(model, backend="sparse", options=options)
    ppl_sparse = perplexity(compiled, ids)
    print(f"\ncompiled in {time.perf_counter() - start:.0f} s (Inductor)")
    ppl_dense = perplexity(model, ids)
    print(f"quality: perplexity eager {ppl_dense:.3f}, sparse {ppl_sparse:.3f} (ratio {ppl_sparse / ppl_dense:.4f})")
    eager_ms, sparse_ms = median_ms(model, ids), median_ms(compiled, ids)
    print(f"speed: {ids.shape[1]}-token prefill, 1 thread, median of 5: eager {eager_ms:.0f} ms, "
          f"sparse {sparse_ms:.0f} ms ({eager_ms / sparse_ms:.2f}x)")


if __name__ == "__main__":
    main()
