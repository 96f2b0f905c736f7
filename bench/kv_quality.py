"""KV-eviction quality on SmolLM2, ctx-continuation protocol (docs/evaluation.md): every method at every
ratio, beside dense, truncate and (with --kvpress) kvpress 0.5.5's presses on the same documents.

    OMP_NUM_THREADS=1 .venv/bin/python bench/kv_quality.py --json docs/kv_quality.json
    bash bench/setup_kvpress.sh && OMP_NUM_THREADS=1 .venv/bin/python bench/kv_quality.py --kvpress-only --json docs/kvpress_quality.json

Our methods run through torch.compile(backend="sparse") with lowering "eager" (the same rewritten
graph, without Inductor's compile time; tests check Inductor gives the same cache).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

import torch

from compile_sparse import eval as ev

METHODS = ["streaming_llm", "snapkv", "h2o", "tova", "knorm", "hitkv", "pyramidkv"]
# Caches differ in length per layer: the continuation goes one token at a time, through the plain
# model (these methods have no decode rule, so the compiled graph would be the dense one).
PER_LAYER = {"pyramidkv"}
PRESSES = {"snapkv": "SnapKVPress", "tova": "TOVAPress", "observed_attention": "ObservedAttentionPress",
           "streaming_llm": "StreamingLLMPress", "knorm": "KnormPress", "pyramidkv": "PyramidKVPress",
           "keydiff": "KeyDiffPress", "expected_attention": "ExpectedAttentionPress"}


def ours(model, docs, dense, methods, ratios, params):
    rows = []
    for method in methods:
        for ratio in ratios:
            options = {"kv": {"method": method, "compression_ratio": ratio, **params.get(method, {})},
                       "lowering": "eager"}
            torch.compiler.reset()
            compiled = ev.compiled_forward(model, options)
            forward = ev.model_forward(model if method in PER_LAYER else compiled)
            result = ev.ctx_continuation(f"{method} {ratio}", ev.model_prefill(compiled), forward, docs, dense,
                                         one_token_at_a_time=method in PER_LAYER)
            rows.append({"method": method, "ratio": ratio, "options": options, **result.to_dict()})
            print(f"{method:>14} {ratio:.2f}  ppl ratio {result.ppl_ratio:.4f}", flush=True)
    return rows


def kvpress_rows(model, docs, dense, presses, ratios):
    import kvpress  # installed by bench/setup_kvpress.sh

    rows = []
    for name in presses:
        # ObservedAttentionPress reads the attention weights (eager attention); the others run on SDPA,
        # which also lets PyramidKV's layers differ in length (eager attention adds one mask to every layer)
        model.set_attn_implementation("eager" if name == "observed_attention" else "sdpa")
        for ratio in ratios:
            press = getattr(kvpress, PRESSES[name])(compression_ratio=ratio)

            def prefill(ids, press=press):
                with press(model):
                    out = model(input_ids=ids, use_cache=True, cache_position=torch.arange(ids.shape[1]))
                return out.logits[:, -1], out.past_key_values

            result = ev.ctx_continuation(f"kvpress {name} {ratio}", prefill, ev.model_forward(model), docs, dense,
                                         one_token_at_a_time=name in PER_LAYER)
            rows.append({"method": f"kvpress:{name}", "ratio": ratio, **result.to_dict()})
            print(f"{'kvpress ' + name:>26} {ratio:.2f}  ppl ratio {result.ppl_ratio:.4f}", flush=True)
    model.set_attn_implementation("sdpa")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=METHODS)
    parser.add_argument("--ratios", nargs="*", type=float, default=[0.5, 0.75, 0.9])
    parser.add_argument("--docs", type=int, default=8, help="number of test documents (docs/evaluation.md: 8)")
    parser.add_argument("--split", choices=("test", "calibration"), default="test",
                        help="calibration: the 8 speeches before the test ones, to choose parameters on")
    parser.add_argument("--params", default="{}", help='JSON per method, e.g. {"h2o": {"recent_window": 64}}')
    parser.add_argument("--kvpress", nargs="*", default=None, help=f"also run these kvpress presses: {', '.join(PRESSES)}")
    parser.add_argument("--kvpress-only", action="store_true", help="skip our methods and truncate")
    parser.add_argument("--no-truncate", action="store_true", help="skip the truncate rows (parameter sweeps)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    model, _, docs, dense = ev.smollm2_documents(args.docs, args.split)
    rows = [{"method": "dense", "ratio": 0.0, "ppl_ratio": 1.0, "ppl": dense}]
    if not args.kvpress_only:
        for ratio in [] if args.no_truncate else args.ratios:
            result = ev.ctx_continuation(f"truncate {ratio}", ev.truncate_prefill(model, ratio), ev.model_forward(model),
                                         docs, dense)
            rows.append({"method": "truncate", "ratio": ratio, **result.to_dict()})
            print(f"{'truncate':>14} {ratio:.2f}  ppl ratio {result.ppl_ratio:.4f}", flush=True)
        rows += ours(model, docs, dense, args.methods, args.ratios, json.loads(args.params))
    presses = list(PRESSES) if args.kvpress == [] or args.kvpress_only and not args.kvpress else args.kvpress
    if presses:
        rows += kvpress_rows(model, docs, dense, presses, args.ratios)
    out = {"model": "smollm2", "protocol": "ctx-continuation", "split": args.split, "documents": list(docs), "rows": rows,
           "command": shlex.join(sys.argv), "seconds": round(time.perf_counter() - start)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print(f"done in {out['seconds']} s", file=sys.stderr)


if __name__ == "__main__":
    main()
