"""Prune 20% of SmolLM2's MLP neurons with FLAP (calibrated on two State of the Union speeches),
save the plan, export a smaller checkpoint, load it back as a plain transformers model, and compare
sizes, perplexity on a held-out window and the time of a forward. About a minute on 2 CPU cores.

    .venv/bin/python examples/prune_and_export.py [--mlp-ratio 0.2] [--out /tmp/smollm2-pruned]
"""

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import compile_sparse
from compile_sparse import eval as ev
from compile_sparse import models


def ppl(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
    return math.exp(F.cross_entropy(logits.float(), ids[0, 1:]).item())


def forward_ms(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mlp-ratio", type=float, default=0.2)
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "smollm2-pruned"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = models.load("smollm2")
    calibration = ev.calibration_batches(tokenizer, length=512, count=2)  # 2 x (1, 512), never the test text
    test = ev.document_ids(tokenizer, models.sotu_documents("test", 1), length=512)  # (1, 512)
    ids = next(iter(test.values()))
    plan_path = Path(args.out).with_suffix(".plan.json")

    options = {"prune": {"method": "flap", "mlp_ratio": args.mlp_ratio, "allocation": "standardized",
                         "calibration": calibration, "save_plan": str(plan_path)}, "lowering": "eager"}
    report = compile_sparse.explain(model, input_ids=ids, use_cache=False, options=options)
    pruned = report.passes[0]
    print(f"FLAP, {args.mlp_ratio:.0%} of the MLP neurons, calibrated on {len(calibration)} x 512 tokens:")
    print(f"  MLPs rewritten: {pruned['rewrites']['mlp']}; parameters of the pruned sites "
          f"{pruned['params']['before']:,} -> {pruned['params']['after']:,}")
    print(f"  plan saved to {plan_path}")

    plan = compile_sparse.Plan.load(plan_path)
    folder = compile_sparse.export(model, plan, args.out, tokenizer=tokenizer)
    smaller, _ = models.load(folder)  # a plain transformers model at the pruned width
    sizes = [sum(p.numel() for p in m.parameters()) for m in (model, smaller)]
    print(f"exported to {folder}: {sizes[0] / 1e6:.1f} M -> {sizes[1] / 1e6:.1f} M parameters; "
          f"intermediate sizes per layer {sorted({l.mlp.up_proj.out_features for l in smaller.model.layers})}")
    print(f"perplexity on 512 held-out tokens: dense {ppl(model, ids):.2f}, pruned {ppl(smaller, ids):.2f}")
    print(f"one forward of 512 tokens, eager: dense {forward_ms(model, ids):.0f} ms, pruned {forward_ms(smaller, ids):.0f} ms")


if __name__ == "__main__":
    main()
