"""``compile-sparse``: the command line. Options are the torch.compile options dict, as JSON.

    compile-sparse inspect MODEL [--options JSON] [--json FILE] [--seq-len N] [--per-layer] [--quiet]
    compile-sparse methods [--json FILE]
    compile-sparse eval MODEL --protocol {ctx-continuation,window-ppl,minilm,retrieval} [--options JSON ...]
                       [--method NAME ... --ratios R ...] [--docs N] [--json FILE] [--plot FILE.png] [--quiet]
                       [--tasks TASK ...] [--length N] [--setting {query-aware,query-agnostic}] [--cases N] [--first-case I]
    compile-sparse bench MODEL [--context N] [--options JSON] [--batch B] [--runs N] [--json FILE] [--quiet]

MODEL is a zoo name or a local folder that transformers loads (config.json, weights, its tokenizer).
Progress goes to stderr (a bar on a terminal, a line a minute in a log); --quiet turns it off.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect as inspect_module
import json
import logging
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from . import benchmark
from . import eval as ev
from . import models
from . import retrieval
from .explain import explain
from .options import parse_options
from .passes.registry import FAMILIES, METHODS
from .passes.tokens.schedule import per_layer
from .progress import progress, set_quiet
from .timing import prefill

PROTOCOLS = ("ctx-continuation", "window-ppl", "minilm", "retrieval")


def _inspect(args: argparse.Namespace) -> int:
    model, tokenizer = models.load(args.model)
    inputs = models.sample_inputs(args.model, model, tokenizer, seq_len=args.seq_len)
    report = explain(model, options=args.options, **inputs)
    print(report.format(per_layer=args.per_layer))
    if args.json:
        data = {"model": args.model, **report.to_dict()}
        Path(args.json).write_text(json.dumps(data, indent=1, default=str))
        print(f"wrote {args.json}")
    return 0


def _settings(args: argparse.Namespace) -> list[dict]:
    """The options dicts to evaluate: each ``--options``, and each ``--method`` at each of
    ``--ratios`` (a KV method's compression_ratio)."""
    settings = [json.loads(o) if isinstance(o, str) else o for o in args.options or []]
    settings += [{"kv": {"method": method, "compression_ratio": r}} for method in args.method or []
                 for r in args.ratios or [0.75]]
    if not settings:
        raise ValueError("nothing to evaluate: give --options JSON (repeatable) or --method NAME [--ratios R ...]")
    for options in settings:
        parse_options(ev.with_calibration(options, None))  # a bad option fails here, before minutes of evaluation
    return settings


def _label(options: dict) -> str:
    """A short name for a setting: its recipe and family methods with their parameters."""
    parts = [f"recipe {options['recipe']}"] if options.get("recipe") else []
    for family in ("prune", "tokens", "kv"):
        value = options.get(family)
        if isinstance(value, dict):
            params = ", ".join(f"{k}={v}" for k, v in value.items() if k not in ("method", "calibration"))
            parts.append(f"{value.get('method', family)}({params})" if params else str(value.get("method", family)))
        elif value is not None:
            parts.append(str(value))
    return " + ".join(parts) or "default recipe"


def _series(options: dict) -> str:
    """The line a setting belongs to on the plot: its methods without their parameters."""
    parts = [options["recipe"]] if options.get("recipe") else []
    parts += [str(v.get("method") if isinstance(v, dict) else v) for f in ("prune", "tokens", "kv")
              if (v := options.get(f)) is not None]
    return " + ".join(parts) or "default recipe"


def _ctx_continuation(args, model, tokenizer, settings) -> tuple[list[dict], list[dict]]:
    docs = ev.document_ids(tokenizer, models.sotu_documents("test", args.docs))
    dense = ev.dense_ppl(model, docs)
    dense_geomean = math.exp(sum(math.log(p) for p in dense.values()) / len(dense))
    rows, points, truncated = [], [], {}
    for options in progress(settings, desc="settings", unit="setting"):
        options = ev.with_calibration(options, tokenizer)
        torch.compiler.reset()
        compiled = ev.compiled_forward(model, {"lowering": "eager", **options})
        prefill = ev.reread_prefill(compiled, tokenizer) if retrieval.rereads(options) else ev.model_prefill(compiled)
        result = ev.ctx_continuation(_label(options), prefill, ev.model_forward(compiled), docs, dense)
        saved = 1 - sum(result.cache_tokens) / (len(result.cache_tokens) * ev.CONTEXT)
        ratio = round(saved, 4)
        if ratio > 0 and ratio not in truncated:
            truncated[ratio] = ev.ctx_continuation(f"truncate {ratio}", ev.truncate_prefill(model, ratio),
                                                   ev.model_forward(model), docs, dense)
            points.append({"series": "truncate", "x": ratio, "y": truncated[ratio].ppl_ratio})
        points.append({"series": _series(options), "x": saved, "y": result.ppl_ratio})
        rows.append({"options": _jsonable(options), "setting": _label(options), "kv_saved": saved,
                     "ppl": result.to_dict()["geomean_ppl"], "ppl_dense": dense_geomean,
                     "ppl_ratio": result.ppl_ratio, "truncate_ppl_ratio": truncated[ratio].ppl_ratio if ratio > 0 else None,
                     "cache_tokens": result.cache_tokens,
                     "documents": {d: {"ppl": result.ppl[d], "ppl_dense": dense[d]} for d in docs}})
    return rows, points


def _window_ppl(args, model, tokenizer, settings) -> tuple[list[dict], list[dict]]:
    docs = ev.document_windows(tokenizer, models.sotu_documents("test", args.docs))
    dense = ev.window_ppl("dense", ev.logits_forward(model), docs)
    total = sum(p.numel() for p in model.parameters())
    rows, points = [], []
    for options in progress(settings, desc="settings", unit="setting"):
        options = ev.with_calibration(options, tokenizer, length=ev.WINDOW)
        window = next(iter(docs.values()))[:1]  # (1, W): the compiled shape
        report = explain(model, input_ids=window, use_cache=False, options=options)
        removed = sum(p["params"]["before"] - p["params"]["after"] for p in report.passes if p["params"])
        torch.compiler.reset()
        compiled = ev.compiled_forward(model, {"lowering": "eager", **options})
        result = ev.window_ppl(_label(options), ev.logits_forward(compiled), docs, dense.ppl)
        points.append({"series": _series(options), "x": removed / total, "y": result.ppl_ratio})
        rows.append({"options": _jsonable(options), "setting": _label(options), "params_removed": removed / total,
                     "ppl": result.to_dict()["geomean_ppl"], "ppl_dense": dense.to_dict()["geomean_ppl"],
                     "ppl_ratio": result.ppl_ratio,
                     "documents": {d: {"ppl": result.ppl[d], "ppl_dense": dense.ppl[d]} for d in docs}})
    return rows, points


def _minilm(args, model, tokenizer, settings) -> tuple[list[dict], list[dict]]:
    from ._torch_internals import compile_per_shape
    from .backend import sparse_backend

    speech, text = models.sotu_documents("test", 1)[0]
    sentences = ev.sentences(text, tokenizer)[:args.sentences]
    embed = ev.mean_pooled(model)
    with torch.no_grad():
        dense = [embed(s, torch.ones_like(s)) for s in sentences]
    layers = model.config.num_hidden_layers
    rows, points, truncated = [], [], {}
    for options in progress(settings, desc="settings", unit="setting"):
        tokens = parse_options(options).methods.get("tokens")
        fraction = sum(per_layer(tokens.layers, list(tokens.keep_ratios), 1.0, layers)) / layers if tokens else 1.0
        torch.compiler.reset()
        compiled = compile_per_shape(embed, functools.partial(sparse_backend, options={"lowering": "eager", **options}))
        result = ev.minilm_cosine(_label(options), compiled, dense, sentences, fraction)
        key = round(fraction, 4)
        if key < 1 and key not in truncated:
            truncated[key] = ev.minilm_cosine(f"truncate {key}", ev.truncated_sentences(embed, fraction), dense,
                                              sentences, fraction)
            points.append({"series": "truncate", "x": 1 - fraction, "y": truncated[key].mean_cosine})
        points.append({"series": _series(options), "x": 1 - fraction, "y": result.mean_cosine})
        rows.append({"options": _jsonable(options), "setting": _label(options), "speech": speech,
                     "tokens_removed": 1 - fraction, **result.to_dict(),
                     "truncate_mean_cosine": truncated[key].mean_cosine if key < 1 else None})
    return rows, points


def _retrieval(args, model, tokenizer, settings) -> tuple[list[dict], list[dict]]:
    """Dense, truncation and each setting on the retrieval cases: accuracy per task and their mean."""
    if args.length < 256:
        raise ValueError(f"--length {args.length}: retrieval prompts need at least 256 tokens")
    if args.cases < 1:
        raise ValueError(f"--cases {args.cases}: at least 1")
    cases = retrieval.make_cases(tokenizer, tuple(args.tasks), args.length, args.cases, args.first_case)

    dense, truncate, outcomes = retrieval.run(model, tokenizer, cases, settings, args.setting,
                                              labels=[_label(o) for o in settings])
    rows, points = [], []
    for options, outcome in zip(settings, outcomes):
        ratio = retrieval.truncate_ratio(options) or round(outcome.kv_removed, 3)
        base = truncate.get(ratio)
        rows.append({"options": _jsonable(options), "setting": _label(options), "retrieval_setting": args.setting,
                     "length": args.length, "cases": args.cases, "first_case": args.first_case, "kv_removed": outcome.kv_removed,
                     "accuracy": outcome.accuracy, "accuracy_dense": dense.accuracy,
                     "accuracy_truncate": base.accuracy if base else None,
                     "tasks": {task: {"accuracy": value, "accuracy_dense": dense.tasks[task],
                                      "accuracy_truncate": base.tasks[task] if base else None}
                               for task, value in outcome.tasks.items()},
                     "answers": outcome.texts, "answers_dense": dense.texts})
        points.append({"series": _series(options), "x": outcome.kv_removed, "y": outcome.accuracy})
    points += [{"series": "truncate", "x": r, "y": o.accuracy} for r, o in truncate.items()]
    return rows, points


def _jsonable(options: dict) -> dict:
    return json.loads(json.dumps(options, default=lambda v: f"<{type(v).__name__}>"))


def _eval(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    settings = _settings(args)
    model, tokenizer = models.load(args.model)
    _require_kind(args.model, model, "encoder" if args.protocol == "minilm" else "causal-lm",
                  f"--protocol {args.protocol}")
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer: the protocols score real text (a model folder needs "
                         "its tokenizer saved in it)")
    run = {"ctx-continuation": _ctx_continuation, "window-ppl": _window_ppl, "minilm": _minilm,
           "retrieval": _retrieval}[args.protocol]
    with torch.no_grad():
        rows, points = run(args, model, tokenizer, settings)
    higher = args.protocol in ("minilm", "retrieval")
    x_name = {"ctx-continuation": "KV saved", "window-ppl": "params removed", "minilm": "tokens removed",
              "retrieval": "KV removed"}[args.protocol]
    metric = {"minilm": "mean cosine", "retrieval": "accuracy"}.get(args.protocol, "ppl ratio")
    value_key, base_key = {"minilm": ("mean_cosine", "truncate_mean_cosine"),
                           "retrieval": ("accuracy", "accuracy_truncate")}.get(args.protocol,
                                                                               ("ppl_ratio", "truncate_ppl_ratio"))
    title = args.protocol
    if args.protocol == "retrieval":
        title += (f" ({args.setting}, {args.length} tokens, {args.cases} cases x {', '.join(args.tasks)}; "
                  f"dense {rows[0]['accuracy_dense']:.3f})")
    print(f"\n{args.model}, {title}")
    print(f"{'setting':<60} {x_name:>14} {metric:>11} {'truncate':>9}")
    for row, point in zip(rows, [p for p in points if p["series"] != "truncate"]):
        value, base = row[value_key], row.get(base_key)
        print(f"{row['setting'][:60]:<60} {point['x']:>13.1%} {value:>11.4f} {'—' if base is None else f'{base:.4f}':>9}")
    if args.json:
        data = {"model": args.model, "protocol": args.protocol, **rows[0], "settings": rows,
                "command": "compile-sparse " + shlex.join(args.argv), "seconds": round(time.perf_counter() - start)}
        Path(args.json).write_text(json.dumps(data, indent=1))
        print(f"wrote {args.json}")
    if args.plot:
        from .plot import quality_plot

        quality_plot(points, args.plot, title=f"{args.model}: {args.protocol}", x_label=f"{x_name} (fraction)",
                     y_label=metric, higher_is_better=higher)
        print(f"wrote {args.plot}")
    return 0


def _require_kind(name: str, model: torch.nn.Module, kind: str, what: str) -> None:
    """A clear error when ``what`` (a protocol, the bench) cannot run on the kind of model ``name`` is."""
    found = models.model_kind(name, model)
    if found != kind:
        raise ValueError(f"{what} needs a model of kind {kind}; {name} is of kind {found} ({type(model).__name__})")


def _bench(args: argparse.Namespace) -> int:
    model, tokenizer = models.load(args.model)
    _require_kind(args.model, model, "causal-lm", "bench (prefill and decode steps)")
    options = json.loads(args.options) if args.options else {}
    parse_options(options)
    torch.set_num_threads(args.threads)
    if tokenizer is None:  # a random test model: random token ids (only the time matters)
        ids = models.sample_inputs(args.model, model, seq_len=args.context, batch=args.batch)["input_ids"]
    else:
        options = ev.with_calibration(options, tokenizer, length=args.context)
        ids = models.sotu_ids(tokenizer, args.context).repeat(args.batch, 1)  # (B, context)
    if ids.shape[1] < args.context:
        raise ValueError(f"the text has {ids.shape[1]} tokens, fewer than --context {args.context}")
    print(f"{args.model}: {args.batch} x {args.context} tokens, {torch.get_num_threads()} thread(s), Inductor on "
          f"every side; the sides timed in turn for {args.runs} rounds, medians, ratios taken round by round", flush=True)
    result: dict = {"model": args.model, "options": _jsonable(options), "context": args.context, "batch": args.batch,
                    "threads": torch.get_num_threads(), "rounds": args.runs}
    with torch.no_grad():
        if args.compile_time:
            result["compile_s"] = benchmark.compile_times(model, options, ids)
            for state, sides in result["compile_s"].items():
                print(f"  compile ({state} Inductor cache): prefill dense {sides['dense']['prefill']:.1f} s, sparse "
                      f"{sides['sparse']['prefill']:.1f} s; decode dense {sides['dense']['decode']:.1f} s, sparse "
                      f"{sides['sparse']['decode']:.1f} s", flush=True)
        torch.compiler.reset()
        dense, sparse = benchmark.compiled(model, options)
        result["prefill"] = benchmark.prefill_times(dense, sparse, ids, args.runs)
        dense_cache = prefill(dense, ids)().past_key_values
        sparse_cache = prefill(sparse, ids)().past_key_values
        decode = benchmark.decode_times(dense, sparse, dense_cache, sparse_cache, args.context, args.runs)
    result.update(kv_bytes_dense=decode.pop("kv_bytes_dense"), kv_bytes_sparse=decode.pop("kv_bytes_sparse"),
                  decode=decode)
    print(f"  prefill: dense {result['prefill']['dense_ms']:.0f} ms, sparse {result['prefill']['sparse_ms']:.0f} ms; "
          f"decode step: dense {decode['dense_ms']:.1f} ms, ideal {decode['ideal_ms']:.1f} ms, sparse "
          f"{decode['sparse_ms']:.1f} ms ({decode['vs_ideal']:.3f}x the ideal round by round, that ratio's interquartile "
          f"spread {decode['ratio_spread']['vs_ideal']:.1%}); KV cache "
          f"{result['kv_bytes_dense'] / 1e6:.1f} -> {result['kv_bytes_sparse'] / 1e6:.1f} MB", flush=True)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return 0


def _methods(args: argparse.Namespace) -> int:
    """Every registered method with its parameters and defaults (what ``options[family]`` accepts)."""
    listing = {}
    for family in FAMILIES:
        for name in sorted(METHODS[family]):
            cls = METHODS[family][name]
            params = {f.name: ("<required>" if f.default is dataclasses.MISSING else f.default)
                      for f in dataclasses.fields(cls) if f.name != "calibration"}
            summary = (inspect_module.getdoc(cls) or "").split("\n")[0]
            listing.setdefault(family, {})[name] = {"config": cls.__name__, "parameters": params, "summary": summary}
            print(f"{family:7s} {name:14s} {cls.__name__:20s} " + ", ".join(f"{k}={v!r}" for k, v in params.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(listing, indent=1, default=str))
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="compile-sparse", description=__doc__.splitlines()[0],
                                     epilog=__doc__.strip().split("\n\n")[-1])  # MODEL and the progress bars
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the backend does")
    sub = parser.add_subparsers(dest="command", required=True)
    long_work = argparse.ArgumentParser(add_help=False)
    long_work.add_argument("--quiet", action="store_true",
                           help="no progress on stderr (a bar on a terminal, a line a minute in a log)")
    inspect = sub.add_parser("inspect", parents=[long_work],
                             help="show the attention / MLP sites found and what the options would change")
    inspect.add_argument("model", help=f"a zoo model ({', '.join(models.ZOO)}) or a local model folder")
    inspect.add_argument("--options", default=None, help="the torch.compile options dict, as JSON")
    inspect.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON")
    inspect.add_argument("--seq-len", type=int, default=32, help="tokens in the sample input (default 32)")
    inspect.add_argument("--per-layer", action="store_true", help="one row per layer (default: identical layers grouped)")
    inspect.set_defaults(run=_inspect)
    listing = sub.add_parser("methods", help="list the registered compression methods and their parameters")
    listing.add_argument("--json", default=None, metavar="FILE", help="also write the list as JSON")
    listing.set_defaults(run=_methods, quiet=False)
    evaluate = sub.add_parser("eval", parents=[long_work],
                              help="quality of one or more settings against dense and truncation (docs/evaluation.md)")
    evaluate.add_argument("model", help="a model with a tokenizer: smollm2 or a local causal-LM folder "
                                        "(ctx-continuation, window-ppl, retrieval), minilm (minilm)")
    evaluate.add_argument("--protocol", required=True, choices=PROTOCOLS)
    evaluate.add_argument("--options", action="append", help="a setting: the torch.compile options dict as JSON (repeatable)")
    evaluate.add_argument("--method", nargs="+", default=None, help="shorthand: each of these KV methods at each of --ratios")
    evaluate.add_argument("--ratios", nargs="*", type=float, default=None, help="compression ratios for --method (default 0.75)")
    evaluate.add_argument("--docs", type=int, default=8, help="test documents (docs/evaluation.md: 8)")
    evaluate.add_argument("--sentences", type=int, default=None, help="minilm: only the first N sentences")
    evaluate.add_argument("--tasks", nargs="+", default=list(retrieval.TASKS), choices=retrieval.TASKS, metavar="TASK",
                          help=f"retrieval: tasks (default all: {', '.join(retrieval.TASKS)})")
    evaluate.add_argument("--length", type=int, default=retrieval.LENGTH, help="retrieval: prompt tokens (default 2048)")
    evaluate.add_argument("--setting", default=retrieval.SETTINGS[0], choices=retrieval.SETTINGS,
                          help="retrieval: the question inside the prefilled prompt (query-aware, default) or fed after "
                               "the context is compressed (query-agnostic)")
    evaluate.add_argument("--cases", type=int, default=retrieval.CASES, help="retrieval: cases per task (default 50)")
    evaluate.add_argument("--first-case", type=int, default=0,
                          help="retrieval: index of the first case (default 0; the tables use 0..49, a later range "
                               "is held out for choosing parameters)")
    evaluate.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    evaluate.add_argument("--plot", default=None, metavar="FILE.png", help="draw quality against compression")
    evaluate.set_defaults(run=_eval)
    bench = sub.add_parser("bench", parents=[long_work],
                           help="prefill and decode time, and KV bytes, against dense (Inductor on both sides)")
    bench.add_argument("model", help="a causal LM: smollm2 or a local folder with its tokenizer (real text), or one "
                                     "without a tokenizer (tiny-llama: random ids)")
    bench.add_argument("--context", type=int, default=4096, help="prompt tokens (docs/evaluation.md: 4096)")
    bench.add_argument("--options", default=None, help="the torch.compile options dict, as JSON (default: the default recipe)")
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--runs", type=int, default=5, help="timed rounds (every side once a round, in turn)")
    bench.add_argument("--compile-time", action="store_true",
                       help="also measure compilation (cold and warm Inductor cache), dense against sparse")
    bench.add_argument("--threads", type=int, default=1, help="torch threads (docs/evaluation.md: 1 on 2-core machines)")
    bench.add_argument("--json", default=None, metavar="FILE")
    bench.set_defaults(run=_bench)
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    set_quiet(args.quiet)
    try:
        return args.run(args)
    except (ValueError, ModuleNotFoundError) as err:
        print(f"compile-sparse: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
