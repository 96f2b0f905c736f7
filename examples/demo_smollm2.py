"""Compile the real SmolLM2-135M-Instruct with backend="sparse" and no options (the default recipe,
H2O KV-cache eviction keeping 25% of the prompt's cache): what was found and changed, quality (ctx-continuation on a State of the Union speech, beside dense and
truncation) and speed (one decode step over the compressed cache, beside dense), all on CPU.

    python examples/demo_smollm2.py [--options JSON] [--context 1024]
"""

import argparse
import json
import math
import statistics
import time

import torch

import compile_sparse
from compile_sparse import eval as ev
from compile_sparse import models

DEFAULT_OPTIONS: dict = {}  # no options: the default recipe (compile_sparse.options.DEFAULT_RECIPE)


def decode_ms(forward, cache, position: int, runs: int = 5) -> float:
    """Median time of one decode step over ``cache`` (the first calls compile and are not timed)."""
    token, positions = torch.zeros((1, 1), dtype=torch.long), torch.tensor([[position]])
    times = []
    for i in range(runs + 2):
        start = time.perf_counter()
        forward(input_ids=token, past_key_values=cache, position_ids=positions, use_cache=True)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--options", default=json.dumps(DEFAULT_OPTIONS), help="sparse backend options, as JSON")
    parser.add_argument("--context", type=int, default=1024, help="prompt tokens (then 128 scored continuation tokens)")
    args = parser.parse_args()
    options = json.loads(args.options)
    kv = compile_sparse.parse_options(options).methods.get("kv")
    ratio = kv.compression_ratio if kv is not None else 0.0
    torch.set_num_threads(1)  # stable timings on small machines

    model, tokenizer = models.load("smollm2")
    name, text = models.sotu_documents("test")[-1]
    ids = ev.document_ids(tokenizer, [(name, text)], length=args.context + ev.CONTINUATION)[name]  # (1, C + 128)
    print(f"model: SmolLM2-135M-Instruct, text: {name}, {args.context} prompt tokens, options: "
          f"{json.dumps(options) if options else 'none (the default recipe, ' + compile_sparse.options.DEFAULT_RECIPE + ')'}\n")

    prompt = ids[:, :args.context]
    report = compile_sparse.explain(model, input_ids=prompt, use_cache=True, options=options)
    print(report)
    print("\nwhat changed:", "; ".join(f"{p['family']}:{p['method']} {p['rewrites']}" for p in report.passes)
          or "nothing (no compression method in these options)")

    with torch.no_grad():
        start = time.perf_counter()
        compiled = ev.compiled_forward(model, options)
        nll, cache_tokens = ev.continuation_nll(ev.model_prefill(compiled), ev.model_forward(model), ids, context=args.context)
        print(f"\nprefill through Inductor (compile included): {time.perf_counter() - start:.0f} s; "
              f"cache per layer: {args.context} -> {cache_tokens[0]} tokens")
        dense_nll, _ = ev.continuation_nll(ev.model_prefill(model), ev.model_forward(model), ids, context=args.context)
        line = f"quality: continuation perplexity dense {math.exp(dense_nll):.3f}, sparse {math.exp(nll):.3f} " \
               f"(ratio {math.exp(nll - dense_nll):.4f})"
        if ratio:
            trunc_nll, _ = ev.continuation_nll(ev.truncate_prefill(model, ratio), ev.model_forward(model), ids,
                                               context=args.context)
            line += f"; truncating the prompt to the same size: {math.exp(trunc_nll):.3f} (ratio {math.exp(trunc_nll - dense_nll):.4f})"
        print(line)

        cache = ev.model_prefill(compiled)(prompt)[1]
        sparse_ms = decode_ms(compiled, cache, args.context)
        torch.compiler.reset()
        dense = torch.compile(model.forward, backend="inductor")
        dense_ms = decode_ms(dense, model(input_ids=prompt, use_cache=True).past_key_values, args.context)
    print(f"speed: one decode step, 1 thread, median of 5, both through Inductor: dense {dense_ms:.1f} ms over "
          f"{args.context} cached tokens, sparse {sparse_ms:.1f} ms over {cache.layers[0].keys.shape[-2]} "
          f"({dense_ms / sparse_ms:.2f}x)")


if __name__ == "__main__":
    main()
