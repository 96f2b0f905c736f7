"""Encoder token reduction (EViT, ToMe) on all-MiniLM-L6-v2, the MiniLM embeddings protocol
(docs/evaluation.md): mean cosine similarity of compressed to dense sentence embeddings over the sentences of
the most recent SotU speech, beside the naive baseline (each sentence truncated to the same share
of its tokens).

    OMP_NUM_THREADS=1 .venv/bin/python bench/token_minilm.py --json docs/data/token_minilm.json

A setting is ``method@layers:keeps``, e.g. ``evit@1:0.64`` or ``tome@1,2,3:0.8,0.65,0.55``. Its token
fraction is the tokens the 6 layers process, relative to dense (mean over layers). Every sentence
length compiles once (Dynamo static shapes), with lowering "eager".
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import sys
import time

import torch

from compile_sparse import eval as ev
from compile_sparse import models
from compile_sparse._torch_internals import compile_per_shape
from compile_sparse.backend import sparse_backend
from compile_sparse.passes.tokens.schedule import per_layer

NUM_LAYERS = 6


def parse_setting(text: str) -> tuple[str, list[int], list[float]]:
    method, schedule = text.split("@")
    layers, keeps = schedule.split(":")
    return method, [int(x) for x in layers.split(",")], [float(x) for x in keeps.split(",")]


def token_fraction(layers: list[int], keeps: list[float]) -> float:
    """Tokens the layers process under a schedule, relative to dense (mean over layers)."""
    return sum(per_layer(layers, keeps, 1.0, NUM_LAYERS)) / NUM_LAYERS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="*", default=["evit@1:0.64", "tome@1,2,3,4,5:0.8,0.7,0.6,0.55,0.55"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    model, tokenizer = models.load("minilm")
    speech, text = models.sotu_documents("test", 1)[0]
    ids = ev.sentences(text, tokenizer)
    embed = ev.mean_pooled(model)
    with torch.no_grad():
        dense = [embed(s, torch.ones_like(s)) for s in ids]
    rows = []
    for setting in args.settings:
        method, layers, keeps = parse_setting(setting)
        fraction = token_fraction(layers, keeps)
        options = {"tokens": {"method": method, "layers": layers, "keep_ratios": keeps}, "lowering": "eager"}
        torch.compiler.reset()
        compiled = compile_per_shape(embed, functools.partial(sparse_backend, options=options))
        for name, fn in ((setting, compiled), (f"truncate {fraction:.3f}", ev.truncated_sentences(embed, fraction))):
            result = ev.minilm_cosine(name, fn, dense, ids, fraction)
            rows.append({"setting": name, "options": options if fn is compiled else None, **result.to_dict()})
            print(f"{name:>40}  tokens {fraction:.3f}  mean cosine {result.mean_cosine:.4f}  "
                  f"min {min(result.cosines):.4f}", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"model": "all-MiniLM-L6-v2", "protocol": "minilm", "speech": speech,
                               "sentences": len(ids), "rows": rows, "command": shlex.join(sys.argv),
                               "seconds": round(time.perf_counter() - start)}, f, indent=1)


if __name__ == "__main__":
    main()
