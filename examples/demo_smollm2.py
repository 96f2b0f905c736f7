"""Compile the real SmolLM2-135M-Instruct with backend="sparse" and no options (the default recipe,
TOVA KV-cache eviction per KV head, pooled, keeping 50% of the prompt's cache): what was found and changed, quality
(ctx-continuation on a State of the Union speech, beside dense and truncation) and speed (one
decode step over the compressed cache, beside dense, both through Inductor), all on CPU.

    python examples/demo_smollm2.py [--options JSON] [--context 1024]

Where the time goes (2 cores, cold caches, about 3 minutes): Dynamo traces the prefill once
(``explain`` runs the rewritten graph without Inductor and hands back the compressed cache, 20 s),
the continuations are scored in eager mode (10 s), and Inductor compiles the two decode steps
(sparse about 2 minutes, dense 1.5) side by side: the dense one in a second process, into
Inductor's on-disk cache, from which this process then loads it. Every timed step runs over a
cache of the same length, so nothing recompiles. The first run also converts the GGUF weights
(about 35 s, once).
"""

import argparse
import os
import copy
import json
import math
import multiprocessing
import statistics
import time

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # one core per process: two compile side by side
import torch  # noqa: E402

import compile_sparse
from compile_sparse import eval as ev
from compile_sparse import models, progress

DEFAULT_OPTIONS: dict = {}  # no options: the default recipe (compile_sparse.options.DEFAULT_RECIPE)
STEPS = 9  # timed decode steps per side, interleaved


def cache_bytes(cache) -> int:
    """Bytes the cache's key and value tensors hold, measured."""
    return sum(t.untyped_storage().nbytes() for layer in cache.layers for t in (layer.keys, layer.values))


def decode_step(forward, cache, position: int) -> float:
    """Seconds of one decode step over ``cache`` at ``position``."""
    start = time.perf_counter()
    forward(input_ids=torch.zeros((1, 1), dtype=torch.long), past_key_values=cache,
            position_ids=torch.tensor([[position]]), use_cache=True)
    return time.perf_counter() - start


def compile_dense_decode(context: int) -> None:
    """In a second process: compile the dense decode step through Inductor, which writes it to
    Inductor's on-disk cache (the main process then loads it instead of compiling it)."""
    torch.set_num_threads(1)
    progress.set_quiet(True)  # the main process draws the bars
    model, _ = models.load("smollm2")
    with torch.no_grad():
        cache = model(input_ids=torch.zeros((1, context), dtype=torch.long), use_cache=True).past_key_values
        decode_step(torch.compile(model.forward, backend="inductor", dynamic=False), cache, context)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--options", default=json.dumps(DEFAULT_OPTIONS), help="sparse backend options, as JSON")
    parser.add_argument("--context", type=int, default=1024, help="prompt tokens (then 128 scored continuation tokens)")
    args = parser.parse_args()
    options = json.loads(args.options)
    kv = compile_sparse.parse_options(options).methods.get("kv")
    ratio = kv.compression_ratio if kv is not None else 0.0
    torch.set_num_threads(1)  # stable timings on small machines
    began = time.perf_counter()

    model, tokenizer = models.load("smollm2")
    dense_compile = multiprocessing.get_context("spawn").Process(target=compile_dense_decode, args=(args.context,))
    dense_compile.start()
    name, text = models.sotu_documents("test")[-1]
    ids = ev.document_ids(tokenizer, [(name, text)], length=args.context + ev.CONTINUATION)[name]  # (1, C + 128)
    prompt = ids[:, :args.context]
    print(f"model: SmolLM2-135M-Instruct, text: {name}, {args.context} prompt tokens, options: "
          f"{json.dumps(options) if options else 'none (the default recipe, ' + compile_sparse.options.DEFAULT_RECIPE + ')'}\n")

    report = compile_sparse.explain(model, input_ids=prompt, use_cache=True, logits_to_keep=1, options=options)
    print(report)

    with torch.no_grad():
        logits, cache = report.output.logits[:, -1], report.output.past_key_values  # the rewritten prefill's
        dense_logits, dense_cache = ev.model_prefill(model)(prompt)
        sparse_bytes, dense_bytes = cache_bytes(cache), cache_bytes(dense_cache)
        continue_dense = ev.model_forward(model)  # the continuation runs dense over each cache (a copy)
        nll, _ = ev.continuation_nll(lambda _: (logits, copy.deepcopy(cache)), continue_dense, ids, context=args.context)
        dense_nll, _ = ev.continuation_nll(lambda _: (dense_logits, copy.deepcopy(dense_cache)), continue_dense, ids,
                                           context=args.context)
        quality = f"continuation perplexity {math.exp(dense_nll):.3f} dense -> {math.exp(nll):.3f} ({math.exp(nll - dense_nll) - 1:+.1%})"
        if ratio:
            trunc_nll, _ = ev.continuation_nll(ev.truncate_prefill(model, ratio), continue_dense, ids, context=args.context)
            quality += f"; truncating the prompt to the same size: {math.exp(trunc_nll - dense_nll) - 1:+.1%}"

        evicts = kv is not None and kv.SUPPORTS_DECODE and kv.decode  # the cache keeps its size as it decodes
        sparse_cache = (lambda: cache) if evicts else (lambda: copy.deepcopy(cache))
        start = time.perf_counter()
        sparse_decode = torch.compile(model.forward, backend="sparse", options=options, dynamic=False)
        decode_step(sparse_decode, sparse_cache(), args.context)
        print(f"\nInductor compiled the decode step: sparse {time.perf_counter() - start:.0f} s", end="", flush=True)
        dense_compile.join()
        start = time.perf_counter()
        dense_decode = torch.compile(model.forward, backend="inductor", dynamic=False)
        decode_step(dense_decode, copy.deepcopy(dense_cache), args.context)
        print(f", dense {time.perf_counter() - start:.0f} s")
        sparse_ms, dense_ms = [], []
        for step in range(1, STEPS + 1):  # interleaved, so that both sides see the same machine
            sparse_ms.append(decode_step(sparse_decode, sparse_cache(), args.context + step) * 1e3)
            dense_ms.append(decode_step(dense_decode, copy.deepcopy(dense_cache), args.context + step) * 1e3)
    sparse, dense = statistics.median(sparse_ms), statistics.median(dense_ms)
    kept = cache.layers[0].keys.shape[-2]
    print(f"demo took {time.perf_counter() - began:.0f} s\n")
    print(f"memory:  KV cache {dense_bytes / 2**20:.1f} MiB dense -> {sparse_bytes / 2**20:.1f} MiB "
          f"({args.context} -> {kept} tokens per layer, measured)")
    print(f"quality: {quality}")
    print(f"speed:   one decode step {dense:.1f} ms dense -> {sparse:.1f} ms ({dense / sparse:.2f}x; 1 thread, "
          f"both through Inductor, median of {STEPS} interleaved)")


if __name__ == "__main__":
    main()
