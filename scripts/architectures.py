"""Write docs/architectures.md: what compile_sparse does on every architecture of the zoo matrix
(tests/architectures.py), found by running it, never written by hand.

    .venv/bin/python scripts/architectures.py            # about 4 minutes on 2 cores

For each architecture: the analysis (attention and MLP sites against the config), KV eviction
(h2o at 0.5 on a 24-token prompt, then an 8-token ``generate()`` with the cache the model builds),
head and MLP pruning (magnitude at 0.5), and encoder token merging (ToMe at 0.75); each cell says
what was done or the reason it was left alone, as explain reports it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import compile_sparse  # noqa: E402
from tests.architectures import ARCHITECTURES, build, expected, forward_inputs, inputs  # noqa: E402

KV = {"kv": {"method": "h2o", "compression_ratio": 0.5, "recent_window": 4}}
HEADS = {"prune": {"method": "magnitude", "head_ratio": 0.5}}
MLP = {"prune": {"method": "magnitude", "mlp_ratio": 0.5}}
TOME = {"tokens": {"method": "tome", "layers": [1], "keep_ratios": [0.75]}}


logging.getLogger("compile_sparse").setLevel(logging.ERROR)  # the table says what the warnings would


def _explain(model, kwargs, options):
    torch.compiler.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compile_sparse.explain(model, **kwargs, options=options)


def _pass_cell(report, *kinds: str) -> str:
    """What the pass did to the sites named with one of ``kinds`` ("attention", "mlp"), or why not."""
    done, cross, refused = 0, 0, {}
    for result in report.passes:
        for site, text in result["sites"].items():
            if not any(word in site for word in kinds):
                continue
            if site in result["refused"]:
                refused.setdefault(result["refused"][site], []).append(site)
            elif text.startswith("cross-attention:"):
                cross += 1
            elif not text.startswith("not"):
                done += 1
    cells = [f"yes ({done} site{'s' if done > 1 else ''})"] if done else []
    cells += [f"{cross} cross-attention caches left as they are"] if cross else []
    cells += [f"left alone: {reason}" for reason in refused]
    return "; ".join(cells) or "nothing found to do"


def _analysis_cell(model, report) -> tuple[str, str]:
    want = expected(model.config)
    own = [s for s in report.attention_sites if not s["cross"]]
    cross = [s for s in report.attention_sites if s["cross"]]
    heads = sorted({f"{s['num_heads']}/{s['num_kv_heads']} heads of {s['head_dim']}" for s in report.attention_sites})
    attention = f"{len(own)} self" + (f" + {len(cross)} cross" if cross else "") + f" ({', '.join(heads)})"
    if report.mlp_sites:
        widths = sorted({s["intermediate_size"] for s in report.mlp_sites})
        fused = " fused gate_up" if any(s["fused"] for s in report.mlp_sites) else ""
        mlp = f"{len(report.mlp_sites)}{fused} (width {', '.join(map(str, widths))}; config {want['mlp_width']})"
    else:
        mlp = "none"
    experts = [s for s in report.skipped if s["kind"] == "experts"]
    if experts:
        mlp += f"; {len(experts)} expert groups left alone: {experts[0]['reason']}"
    return attention, mlp


def _generate_cell(name: str) -> str:
    torch.compiler.reset()
    model = build(name)
    model.forward = torch.compile(type(model).forward.__get__(model), backend="sparse", options={**KV, "lowering": "eager"})
    extra = {"decoder_input_ids": torch.arange(3, 19).unsqueeze(0)} if ARCHITECTURES[name].kind == "seq2seq" else {}
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = model.generate(**inputs(name), **extra, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                 pad_token_id=0, return_dict_in_generate=True)
    except Exception as err:  # the table reports it: a crash is what this script exists to show
        return f"FAILS: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
    cache = out.past_key_values
    cache = getattr(cache, "self_attention_cache", cache)
    return "cache per layer " + " / ".join(str(layer.keys.shape[-2]) for layer in cache.layers)


def row(name: str) -> list[str]:
    arch = ARCHITECTURES[name]
    model = build(name)
    kwargs = forward_inputs(name)
    attention, mlp = _analysis_cell(model, _explain(model, kwargs, {"kv": None}))
    cells = [name, f"{arch.kind} ({arch.config.removesuffix('Config')}, {arch.attn})", attention, mlp]
    if arch.kind == "encoder":
        cells += ["— (no cache)", "—"]
    else:
        cached = {**kwargs, "use_cache": True}
        cells += [_pass_cell(_explain(model, cached, KV), "attention"), _generate_cell(name)]
    cells += [_pass_cell(_explain(model, kwargs, HEADS), "attention"), _pass_cell(_explain(model, kwargs, MLP), "mlp", "experts")]
    if arch.kind == "decoder":
        cells.append("— (encoder methods)")
    else:
        encoder = model.get_encoder() if arch.kind == "seq2seq" else model
        report = _explain(encoder, inputs(name), TOME)
        sites = report.passes[0]["sites"]
        cells.append(f"tokens per layer {sites['tokens per layer']}" if "tokens per layer" in sites
                     else f"left alone: {report.passes[0]['refused'].get('graph', sites)}")
    return cells


HEADER = ["architecture", "kind", "attention sites", "MLP sites", "KV eviction (h2o 0.5, prefill)",
          "generate() with h2o 0.5", "head pruning (0.5)", "MLP pruning (0.5)", "token merging (ToMe 0.75)"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "architectures.md"))
    parser.add_argument("--only", nargs="*", help="architectures to run (default: all)")
    args = parser.parse_args()
    names = args.only or list(ARCHITECTURES)
    rows = []
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name}", file=sys.stderr, flush=True)
        rows.append(row(name))
    lines = [
        "# Architectures",
        "",
        "Generated by `.venv/bin/python scripts/architectures.py` from the table in `tests/architectures.py`",
        f"(tiny random models built from transformers {__import__('transformers').__version__}'s own config classes; "
        "2 layers, 24-token prompts). The same table drives the zoo matrix in `tests/test_architectures.py`,",
        "which asserts every cell's behaviour for every registered KV method and data-free prune criterion (`kvzip`,",
        "which compresses through `compress_context`, on six of these in `tests/test_kvzip.py`). Do not edit this",
        "file by hand.",
        "",
        "A cell says what was done or, after \"left alone\", the reason explain gives; those sites run",
        "uncompressed (with a warning, or an error under `\"strict\"`). Sliding-window layers keep HF's window",
        "rule; cross-attention caches (the encoder's keys) are never evicted.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |" for cells in rows]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
