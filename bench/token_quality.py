"""Decoder token dropping (LazyLLM-style) on SmolLM2, ctx-continuation protocol (docs/evaluation.md): each
schedule beside dense, truncate and SnapKV at the same KV-cache size.

    OMP_NUM_THREADS=1 .venv/bin/python bench/token_quality.py --json docs/data/token_quality.json

A schedule ``4:0.5`` keeps 50% of the prompt's tokens from layer 4 on; ``4:0.7,12:0.4`` cuts twice.
Its KV size is the mean over layers of the tokens each layer caches; truncate and SnapKV get the
compression ratio that leaves the same number of cached tokens. Token dropping leaves caches whose
layers differ in length, so the continuation is scored one token at a time through the plain model
(decode steps run dense over the shorter caches). Our passes run with lowering "eager" (the same
rewritten graph; tests check Inductor gives the same outputs).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

import torch

from compile_sparse import eval as ev
from compile_sparse.passes.tokens.schedule import per_layer

NUM_LAYERS = 30  # SmolLM2-135M


def parse_schedule(text: str) -> tuple[list[int], list[float]]:
    """``"4:0.5,12:0.3"`` -> ([4, 12], [0.5, 0.3])."""
    pairs = [part.split(":") for part in text.split(",")]
    return [int(layer) for layer, _ in pairs], [float(keep) for _, keep in pairs]


def kv_ratio(layers: list[int], keeps: list[float], num_layers: int = NUM_LAYERS) -> float:
    """The compression ratio (fraction of cached tokens removed) a schedule gives."""
    return 1 - sum(per_layer(layers, keeps, 1.0, num_layers)) / num_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", nargs="*", default=["4:0.5"])
    parser.add_argument("--params", default="{}", help='JSON of LazyLLM parameters, e.g. {"window": 64, "kernel_size": 5}')
    parser.add_argument("--docs", type=int, default=8, help="number of test documents (docs/evaluation.md: 8)")
    parser.add_argument("--split", choices=("test", "calibration"), default="test",
                        help="calibration: the 8 speeches before the test ones, to choose parameters on")
    parser.add_argument("--no-baselines", action="store_true", help="skip truncate and SnapKV (schedule sweeps)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    model, _, docs, dense = ev.smollm2_documents(args.docs, args.split)
    rows = [{"method": "dense", "ratio": 0.0, "ppl_ratio": 1.0, "ppl": dense}]

    def save() -> None:
        if args.json:
            out = {"model": "smollm2", "protocol": "ctx-continuation", "split": args.split, "documents": list(docs), "rows": rows,
                   "command": shlex.join(sys.argv), "seconds": round(time.perf_counter() - start)}
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)

    for schedule in args.schedules:
        layers, keeps = parse_schedule(schedule)
        ratio = round(kv_ratio(layers, keeps), 4)
        options = {"tokens": {"method": "lazyllm", "layers": layers, "keep_ratios": keeps, **json.loads(args.params)},
                   "lowering": "eager"}
        torch.compiler.reset()
        settings = [(f"lazyllm {schedule}", "lazyllm", ev.model_prefill(ev.compiled_forward(model, options)), True)]
        if not args.no_baselines:
            snapkv = {"kv": {"method": "snapkv", "compression_ratio": ratio}, "lowering": "eager"}
            settings += [(f"truncate {ratio}", "truncate", ev.truncate_prefill(model, ratio), False),
                         (f"snapkv {ratio}", "snapkv", ev.model_prefill(ev.compiled_forward(model, snapkv)), False)]
        for name, method, prefill, uneven in settings:
            result = ev.ctx_continuation(name, prefill, ev.model_forward(model), docs, dense,
                                         one_token_at_a_time=uneven)
            rows.append({"method": method, "schedule": schedule, "ratio": ratio, "options": options if method == "lazyllm"
                         else None, **result.to_dict()})
            print(f"{name:>24}  kv ratio {ratio:.4f}  ppl ratio {result.ppl_ratio:.4f}", flush=True)
            save()
    save()
    print(f"done in {round(time.perf_counter() - start)} s", file=sys.stderr)


if __name__ == "__main__":
    main()
