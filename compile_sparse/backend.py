"""The ``sparse`` torch.compile backend: options -> analysis -> passes -> lowering.

Registered through the ``torch_dynamo_backends`` entry point in pyproject.toml, so
``torch.compile(model, backend="sparse", options={...})`` works without importing this package.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch.fx as fx

from ._torch_internals import (compile_with_inductor, copy_dynamo_graph, fail_on_recompile_limit, graph_break_reasons,
                                on_recompile_limit)
from .analysis import analyze
from .options import SparseOptions, parse_options
from .passes.context import PassContext
from .passes.registry import method_of, pass_for
from .report import GraphReport, format_analysis
from .state import STATE, extend_example_inputs, with_state

log = logging.getLogger("compile_sparse")

class PassError(RuntimeError):
    """A compression pass failed; the message names it and the passes that ran before it."""


class StrictError(PassError):
    """With ``options["strict"]``: something the options ask for cannot be done (the message says
    what and why)."""


class SparseWarning(UserWarning):
    """compile_sparse leaves part of what the options ask for undone: the message says what and why."""


def notify(cause: tuple, message: str, strict: bool) -> None:
    """Say that something asked for is not done: an error with ``strict``, else a warning through
    the ``compile_sparse`` logger and ``warnings``, once per cause in the process."""
    if strict:
        raise StrictError(message)
    if cause in STATE.warned:
        return
    STATE.warned.add(cause)
    log.warning(message)
    warnings.warn(message, SparseWarning, stacklevel=3)


def _recompile_limit(message: str) -> None:
    function = next((line.strip() for line in message.splitlines() if line.strip().startswith("function:")), message)
    notify(("recompile limit", function), f"Dynamo hit its recompile limit ({function}): from now on, inputs of a "
           "shape no compiled graph accepts run eagerly, WITHOUT the compression of backend='sparse' (a token "
           "method, or any compile with dynamic=False, takes one graph per prompt length; use the 'strict' "
           "option to make this an error)", False)


def _report_undone(report: GraphReport, options: SparseOptions) -> None:
    """Warn (or raise, with strict) about every region the options would compress that stays as it is."""
    if not options.methods:
        return
    for region in report.analysis["skipped"]:
        if region["expected"]:
            continue
        notify(("skipped", region["kind"], region["reason"]),
               f"the analysis skipped the {region['kind']} at {region['node']} ({region['module'] or 'no module'}): "
               f"{region['reason']}; it runs uncompressed", options.strict)
    for result in report.passes:
        by_reason = defaultdict(list)
        for site, reason in result["refused"].items():
            by_reason[reason].append(site)
        for reason, sites in by_reason.items():
            notify((result["family"], result["method"], reason),
                   f"{result['family']}:{result['method']} leaves {', '.join(sites)} as {'it is' if len(sites) == 1 else 'they are'}: "
                   f"{reason}", options.strict)
    for reason in graph_break_reasons():
        if reason not in STATE.graph_breaks:
            STATE.graph_breaks.add(reason)
            notify(("graph break", reason), f"Dynamo broke the graph ({reason}): the code between the graphs it "
                   "captured runs eagerly, without compression", options.strict)


class _DebugDump:
    """Writes the graph before and after every pass to ``debug_dir/graph_NNN/``."""

    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        index = len([p for p in root.iterdir() if p.name.startswith("graph_")])
        self.dir = root / f"graph_{index:03d}"
        self.dir.mkdir()
        self.step = 0

    def graph(self, name: str, gm: fx.GraphModule) -> None:
        path = self.dir / f"{self.step:02d}_{name}.py"
        path.write_text(f"# {name}\n{gm.code}\n\n'''\n{gm.graph}\n'''\n")
        self.step += 1

    def text(self, name: str, text: str) -> None:
        (self.dir / name).write_text(text)


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """A digest of this package's Python source: what the functions our graphs call do."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def transform_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], options: SparseOptions,
                    reread: bool = False) -> tuple[fx.GraphModule, GraphReport]:
    """Run the analysis and the passes the options ask for on a copy of ``gm`` (Dynamo keeps reading
    the graph it captured); returns the rewritten copy and a report. ``reread``: the copy is for
    a context's re-read (compile_sparse.compress_context)."""
    gm = copy_dynamo_graph(gm)
    ctx = PassContext(example_inputs, STATE, options.kernels, options.strict, reread)
    dump = _DebugDump(options.debug_dir) if options.debug_dir is not None else None
    analysis = analyze(gm, example_inputs)
    report = GraphReport(analysis=analysis.summary(), passes=[])
    if dump:
        dump.graph("captured", gm)
        dump.text("analysis.txt", format_analysis(report.analysis))
        dump.text("analysis.json", json.dumps(report.analysis, indent=1, default=str))
    done: list[str] = []
    for family, config in options.methods.items():
        if done:
            analysis = analyze(gm, example_inputs)  # the previous pass changed the graph
        name = method_of(config)[1]
        log.info("running %s pass %s", family, name)
        try:
            result = pass_for(config)(gm, analysis, config, ctx)
        except Exception as err:
            raise PassError(f"{family} pass {name!r} failed (passes run before it: {', '.join(done) or 'none'}): "
                            f"{type(err).__name__}: {err}") from err
        gm.graph.lint()
        gm.recompile()
        done.append(f"{family}:{name}")
        report.passes.append(result.to_dict())
        if dump:
            dump.graph(f"after_{family}_{name}", gm)
    if dump:
        dump.graph("final", gm)
    _report_undone(report, options)
    return gm, report


def sparse_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *, options: dict | None = None,
                   mode: str | None = None) -> Callable:
    """torch.compile backend. ``options`` as in compile_sparse.options; ``mode`` goes to Inductor."""
    parsed = parse_options(options)
    if not STATE.watching_recompiles:
        on_recompile_limit(_recompile_limit)
        STATE.watching_recompiles = True
    if parsed.strict:
        fail_on_recompile_limit()
    transformed, report = transform_graph(gm, example_inputs, parsed)
    fn = lower(transformed, example_inputs, parsed.lowering, mode)
    kv = parsed.methods.get("kv")
    if kv is None or not kv.REREAD:
        return fn
    return _with_reread(gm, example_inputs, parsed, mode, fn, report)


def _kv_rewrites(report: GraphReport, kind: str) -> bool:
    return any(p["family"] == "kv" and kind in p["rewrites"] for p in report.passes)


def _with_reread(gm: fx.GraphModule, example_inputs: Sequence[Any], options: SparseOptions, mode: str | None,
                 fn: Callable, report: GraphReport) -> Callable:
    """For a KV method that scores by a re-read (KVzip): ``fn`` and the graph lowered for the
    re-read, which compile_sparse.compress_context's re-read call runs. A prompt the method keeps
    whole outside compress_context is warned about (an error with strict): it is not compressed."""
    transformed, reread_report = transform_graph(gm, example_inputs, options, reread=True)
    reread_fn = lower(transformed, example_inputs, options.lowering, mode) \
        if _kv_rewrites(reread_report, "context re-read") else None
    keeps_whole = _kv_rewrites(report, "prefill kept whole")
    name = method_of(options.methods["kv"])[1]

    def run(*args: Any) -> Any:
        if STATE.context_call == "reread":
            STATE.rereads += 1
            return (reread_fn or fn)(*args)  # None: every site refused (warned), HF's rules
        if keeps_whole and STATE.context_call is None:
            notify(("reread", name), f"kv:{name} keeps every token of a prompt prefilled outside "
                   "compile_sparse.compress_context (generate() included): it compresses a context by re-reading "
                   "it, which compress_context(model, tokenizer, input_ids) does", options.strict)
        return fn(*args)

    return run


def lower(gm: fx.GraphModule, example_inputs: Sequence[Any], lowering: str, mode: str | None = None) -> Callable:
    """Compile a transformed graph ("inductor") or run it as is ("eager"), wrapped so that state the
    passes thread through the graph (compile_sparse.state) stays with the backend."""
    inputs = extend_example_inputs(gm, example_inputs)
    fn = gm.forward if lowering == "eager" else compile_with_inductor(gm, inputs, mode, source_digest())
    return with_state(fn, gm, STATE.store)
