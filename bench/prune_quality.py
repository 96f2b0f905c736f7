"""Structured-pruning quality on SmolLM2, window-ppl protocol (docs/evaluation.md): every criterion at MLP 20%,
MLP 40% and 3 of 9 heads (one per KV group), beside Torch-Pruning 1.6.1 at the same parameter count.

    .venv/bin/python bench/prune_quality.py --json docs/data/prune_quality.json
    bash bench/setup_torch_pruning.sh && .venv/bin/python bench/prune_quality.py --torch-pruning-only --json docs/data/prune_tp.json

Calibration: 512-token windows of the 8 SotU speeches before the test ones (docs/evaluation.md), the first
--calibration windows. Our passes run through torch.compile(backend="sparse") with lowering
"eager" (the same rewritten graph, without Inductor's compile time); Torch-Pruning prunes a copy of
the model in place and runs eagerly. Parameters kept are counted on the physically pruned model.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time

import torch
import torch.nn.functional as F

from compile_sparse import eval as ev
from compile_sparse import models
from compile_sparse.export import shrink_model
from compile_sparse.plan import Plan

CRITERIA = ["magnitude", "wanda", "flap", "taylor", "d2prune"]
SETTINGS = {"mlp20": {"mlp_ratio": 0.2}, "mlp40": {"mlp_ratio": 0.4}, "heads3of9": {"head_ratio": 1 / 3}}


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def ours(model, docs, dense, calibration, criteria, settings, allocations, record):
    for setting in settings:
        for criterion in criteria:
            for allocation in allocations:
                prune = {"method": criterion, **SETTINGS[setting], "allocation": allocation,
                         "save_plan": "/tmp/compile_sparse_bench_plan.json"}
                if criterion != "magnitude" or allocation == "outlier":
                    prune["calibration"] = calibration
                torch.compiler.reset()
                start = time.perf_counter()
                compiled = ev.compiled_forward(model, {"prune": prune, "lowering": "eager"})
                result = ev.window_ppl(f"{criterion} {setting} {allocation}", ev.logits_forward(compiled), docs, dense)
                kept = params(shrink_model(copy.deepcopy(model), Plan.load(prune["save_plan"])))
                record({"method": criterion, "setting": setting, "allocation": allocation, "params": kept,
                        "seconds": round(time.perf_counter() - start), **result.to_dict()})
                print(f"{criterion:>10} {setting:>10} {allocation:>12}  ppl ratio {result.ppl_ratio:8.3f}  "
                      f"params {kept:,}", flush=True)


def nm_rows(model, docs, dense, calibration, criteria, record):
    """2:4 masks on every attention and MLP projection (the shapes stay; half the weights are zero)."""
    for criterion in criteria:
        torch.compiler.reset()
        start = time.perf_counter()
        prune = {"method": "nm", "n": 2, "m": 4, "criterion": criterion,
                 **({"calibration": calibration} if criterion == "wanda" else {})}
        compiled = ev.compiled_forward(model, {"prune": prune, "lowering": "eager"})
        result = ev.window_ppl(f"2:4 {criterion}", ev.logits_forward(compiled), docs, dense)
        record({"method": f"nm:{criterion}", "setting": "nm2:4", "allocation": "uniform", "params": params(model),
                "seconds": round(time.perf_counter() - start), **result.to_dict()})
        print(f"{'2:4 ' + criterion:>14}  ppl ratio {result.ppl_ratio:8.3f}", flush=True)


class LogitsOnly(torch.nn.Module):
    """What Torch-Pruning traces: ids -> logits, no cache."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids, use_cache=False).logits


def torch_pruning_model(model, setting, importance_name, calibration):
    """A copy of ``model`` pruned by Torch-Pruning 1.6.1 to the setting's structure."""
    import torch_pruning as tp

    pruned = copy.deepcopy(model)
    wrapped = LogitsOnly(pruned)
    layers = pruned.model.layers
    cfg = pruned.config
    importance = {"taylor": tp.importance.GroupTaylorImportance(),
                  "magnitude": tp.importance.GroupMagnitudeImportance(p=2)}[importance_name]
    kwargs = {}
    if "mlp_ratio" in SETTINGS[setting]:
        width = cfg.intermediate_size
        removed = width - round(width * (1 - SETTINGS[setting]["mlp_ratio"]))
        # Torch-Pruning keeps int(width x (1 - ratio)) channels: ask for exactly as many as we keep
        kwargs["pruning_ratio_dict"] = {layer.mlp.gate_proj: (removed - 0.5) / width for layer in layers}
        kwargs["ignored_layers"] = [pruned.lm_head] + [getattr(layer.self_attn, p) for layer in layers
                                                       for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    else:
        # Torch-Pruning's GQA head pruning (q heads per KV group, KV heads kept) works on this model
        # when it traces eager attention with q, k and v all declared and the MLPs ignored; with SDPA,
        # or with only q declared, it prunes nothing.
        pruned.set_attn_implementation("eager")
        heads = {}
        for layer in layers:
            heads[layer.self_attn.q_proj] = cfg.num_attention_heads
            heads[layer.self_attn.k_proj] = heads[layer.self_attn.v_proj] = cfg.num_key_value_heads
        kwargs.update(num_heads=heads, prune_num_heads=True, prune_head_dims=False,
                      head_pruning_ratio=SETTINGS[setting]["head_ratio"], pruning_ratio=SETTINGS[setting]["head_ratio"],
                      ignored_layers=[pruned.lm_head] + [getattr(layer.mlp, p) for layer in layers
                                                         for p in ("gate_proj", "up_proj", "down_proj")])
    example = calibration[0]
    kwargs.setdefault("pruning_ratio", 0.0)
    pruner = tp.pruner.BasePruner(wrapped, example, importance=importance, **kwargs)
    if importance_name == "taylor":
        for batch in calibration:
            logits = wrapped(batch)
            F.cross_entropy(logits[0, :-1], batch[0, 1:]).backward()
    pruner.step()
    pruned.zero_grad(set_to_none=True)
    pruned.set_attn_implementation("sdpa")
    for layer in layers:  # Torch-Pruning slices weights; HF's attention reads its head counts
        attn = layer.self_attn
        q_heads = attn.q_proj.out_features // attn.head_dim
        kv_heads = attn.k_proj.out_features // attn.head_dim
        attn.num_key_value_groups = q_heads // kv_heads
    return pruned


def torch_pruning_rows(model, docs, dense, calibration, settings, importances, record):
    for setting in settings:
        for name in importances:
            start = time.perf_counter()
            pruned = torch_pruning_model(model, setting, name, calibration)
            result = ev.window_ppl(f"torch-pruning {name} {setting}", ev.logits_forward(pruned), docs, dense)
            shapes = {"mlp": sorted({layer.mlp.gate_proj.out_features for layer in pruned.model.layers}),
                      "q_heads": sorted({layer.self_attn.q_proj.out_features // layer.self_attn.head_dim
                                         for layer in pruned.model.layers}),
                      "kv_heads": sorted({layer.self_attn.k_proj.out_features // layer.self_attn.head_dim
                                          for layer in pruned.model.layers}),
                      "hidden": sorted({layer.self_attn.o_proj.out_features for layer in pruned.model.layers})}
            record({"method": f"torch-pruning:{name}", "setting": setting, "allocation": "uniform",
                    "params": params(pruned), "shapes": shapes, "seconds": round(time.perf_counter() - start),
                    **result.to_dict()})
            print(f"{'tp ' + name:>10} {setting:>10} {'uniform':>12}  ppl ratio {result.ppl_ratio:8.3f}  "
                  f"params {params(pruned):,}  {shapes}", flush=True)
            del pruned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--criteria", nargs="*", default=CRITERIA)
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--allocations", nargs="*", default=["uniform"])
    parser.add_argument("--docs", type=int, default=8, help="number of test documents (docs/evaluation.md: 8)")
    parser.add_argument("--calibration", type=int, default=16, help="calibration windows of 512 tokens")
    parser.add_argument("--torch-pruning", nargs="*", default=None,
                        help="also run Torch-Pruning with these importances: taylor, magnitude (default taylor)")
    parser.add_argument("--torch-pruning-only", action="store_true", help="skip our criteria")
    parser.add_argument("--nm", nargs="*", default=None, choices=["wanda", "magnitude"],
                        help="also run 2:4 sparsity with these criteria (instead of our structured criteria with --nm-only)")
    parser.add_argument("--nm-only", action="store_true", help="run only the 2:4 rows")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    start = time.perf_counter()
    model, tokenizer = models.load("smollm2")
    docs = ev.document_windows(tokenizer, models.sotu_documents("test", args.docs))
    calib_docs = ev.document_windows(tokenizer, models.sotu_documents("calibration", 8))
    calibration = [w[None] for windows in calib_docs.values() for w in windows][:args.calibration]  # (1, 512) each
    dense = ev.window_ppl("dense", ev.logits_forward(model), docs)
    print(f"dense ppl (geomean) {dense.to_dict()['geomean_ppl']:.3f}, params {params(model):,}", flush=True)
    out = {"model": "smollm2", "protocol": "window-ppl", "documents": list(docs), "calibration_windows": len(calibration),
           "rows": [], "command": shlex.join(sys.argv), "seconds": 0}

    def record(row: dict) -> None:
        """Keep a row and rewrite the JSON, so a run that dies keeps what it measured."""
        out["rows"].append(row)
        out["seconds"] = round(time.perf_counter() - start)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)

    record({"method": "dense", "setting": "dense", "params": params(model), **dense.to_dict()})
    if not (args.torch_pruning_only or args.nm_only):
        ours(model, docs, dense.ppl, calibration, args.criteria, args.settings, args.allocations, record)
    if args.nm is not None or args.nm_only:
        nm_rows(model, docs, dense.ppl, calibration, args.nm or ["wanda", "magnitude"], record)
    importances = args.torch_pruning or (["taylor"] if args.torch_pruning == [] or args.torch_pruning_only else [])
    if importances:
        torch_pruning_rows(model, docs, dense.ppl, calibration, args.settings, importances, record)
    print(f"done in {round(time.perf_counter() - start)} s", file=sys.stderr)


if __name__ == "__main__":
    main()
