"""The report types: what one pass did (PassResult), what the analysis found and the passes did to
one compiled graph (GraphReport), and the Report ``compile_sparse.explain`` returns."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .recipes import DEFAULT_RECIPE


@dataclass
class PassResult:
    """What one pass did: ``rewrites`` counts rewritten sites per kind of rewrite, ``sites`` says
    what changed per site (``{"layer 3 attention": "kept 256 of 1024 tokens"}``), ``kv_cache_bytes``
    the KV cache this graph hands back, before and after the pass (``{"before": n, "after": m}``,
    empty when the pass does not touch the cache or the sizes are symbolic), ``params`` the
    parameters of the sites it prunes, before and after (empty for passes that prune nothing).
    ``refused``: the sites the options ask to compress that the pass leaves as they are, with the
    reason (the backend warns about each reason once, or raises with ``"strict"``)."""

    method: str
    family: str
    rewrites: dict[str, int] = field(default_factory=dict)
    sites: dict[str, str] = field(default_factory=dict)
    kv_cache_bytes: dict[str, int] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)

    def refuse(self, site: str, reason: str, verb: str = "not rewritten") -> None:
        """Leave ``site`` as it is, for ``reason`` (shown in explain, warned about by the backend)."""
        self.refused[site] = reason
        self.sites[site] = f"{verb}: {reason}"

    def count(self, kind: str, n: int = 1) -> None:
        """Add ``n`` rewrites of ``kind``."""
        self.rewrites[kind] = self.rewrites.get(kind, 0) + n

    def to_dict(self) -> dict:
        return {"method": self.method, "family": self.family, "rewrites": dict(self.rewrites),
                "sites": dict(self.sites), "kv_cache_bytes": dict(self.kv_cache_bytes), "params": dict(self.params),
                "refused": dict(self.refused)}


@dataclass
class GraphReport:
    """One compiled graph: the analysis summary (analysis.GraphAnalysis.summary()) and one
    PassResult dict per pass that ran."""

    analysis: dict
    passes: list[dict] = field(default_factory=list)


def format_bytes(n: int) -> str:
    if n < 1024:
        return f"{n:,} B"
    return f"{n / 1024:,.1f} KiB" if n < 1024 ** 2 else f"{n / 1024 ** 2:,.1f} MiB"


def _groups(rows: list[tuple[Any, str]]) -> list[tuple[str, str]]:
    """Consecutive rows (layer, text) with the same text as one row: ("0-29", text)."""
    out: list[list] = []
    for layer, text in rows:
        if out and out[-1][2] == text and isinstance(layer, int) and isinstance(out[-1][1], int) \
                and layer == out[-1][1] + 1:
            out[-1][1] = layer
        else:
            out.append([layer, layer, text])
    return [(str(first) if first == last else f"{first}-{last}", text) for first, last, text in out]


def _rows(rows: list[tuple[Any, str]], per_layer: bool) -> list[tuple[str, str]]:
    return [(str(layer), text) for layer, text in rows] if per_layer else _groups(rows)


def format_analysis(analysis: dict, per_layer: bool = False) -> str:
    """A plain-text table of one graph's sites; consecutive layers with identical rows share one
    row ("0-29") unless ``per_layer``."""
    lines = []
    att = analysis["attention_sites"]
    if att:
        lines.append(f"{'layers':>7}  {'attention':<18} {'heads q/kv':>10} {'head_dim':>8} {'causal':>6} "
                     f"{'q_len':>6} {'kv_len':>6}  {'cache':<11} {'params':>10}")
        rows = [(s["layer"], f"{s['form'] + (' qkv' if s['qkv_fused'] else ''):<18} "
                 f"{str(s['num_heads']) + '/' + str(s['num_kv_heads']):>10} {s['head_dim']:>8} "
                 f"{str(s['causal']):>6} {str(s['q_len']):>6} {str(s['kv_len']):>6}  "
                 f"{s['cache']['kind'] if s['cache'] else '-':<11} {s['params']:>10,}") for s in att]
        lines += [f"{layers:>7}  {text}" for layers, text in _rows(rows, per_layer)]
    mlp = analysis["mlp_sites"]
    if mlp:
        lines.append(f"{'layers':>7}  {'mlp':<18} {'activation':>10} {'hidden':>8} {'inter.':>6} {'params':>26}")
        rows = [(s["layer"], f"{'gated' if s['gated'] else 'plain':<18} {s['activation']:>10} "
                 f"{s['hidden_size']:>8} {s['intermediate_size']:>6} {s['params']:>26,}") for s in mlp]
        lines += [f"{layers:>7}  {text}" for layers, text in _rows(rows, per_layer)]
    for s in analysis["skipped"]:
        lines.append(f"skipped {s['kind']} at {s['node']} ({s['module'] or 'no module'}): {s['reason']}")
    return "\n".join(lines)


def format_sites(sites: dict[str, str], per_layer: bool = False) -> list[str]:
    """What a pass did per site ("layer 3 attention: ..."), consecutive layers with the same words
    on one line ("layers 0-29 attention: ...") unless ``per_layer``."""
    rows = []
    for site, what in sites.items():
        match = re.fullmatch(r"(.*?)layer (\d+) (.+)", site)
        rows.append((site, None, what) if match is None or per_layer
                    else (int(match.group(2)), (match.group(1), match.group(3)), what))
    grouped: list[list] = []
    for layer, kind, what in rows:
        last = grouped[-1] if grouped else None
        if last and kind is not None and last[2] == kind and last[3] == what and last[1] + 1 == layer:
            last[1] = layer
        else:
            grouped.append([layer, layer, kind, what])
    lines = []
    for first, last, kind, what in grouped:
        if kind is None:
            lines.append(f"  {first}: {what}")
        else:
            layers = f"layer {first}" if first == last else f"layers {first}-{last}"
            lines.append(f"  {kind[0]}{layers} {kind[1]}: {what}")
    return lines


@dataclass
class Report:
    """What compile_sparse found and did, per compiled graph, with totals.

    ``str(report)`` is a table; ``report.to_dict()`` is JSON-ready. ``output`` is what the explained
    call returned (``explain`` runs it once, rewritten: a compressed cache comes back), not part of
    the table or the dict.
    """

    options: dict
    graphs: list[GraphReport]
    output: Any = field(default=None, repr=False, compare=False)

    @property
    def attention_sites(self) -> list[dict]:
        return [s for g in self.graphs for s in g.analysis["attention_sites"]]

    @property
    def mlp_sites(self) -> list[dict]:
        return [s for g in self.graphs for s in g.analysis["mlp_sites"]]

    @property
    def skipped(self) -> list[dict]:
        return [s for g in self.graphs for s in g.analysis["skipped"]]

    @property
    def passes(self) -> list[dict]:
        return [p for g in self.graphs for p in g.passes]

    def totals(self) -> dict:
        return {
            "graphs": len(self.graphs),
            "attention_sites": len(self.attention_sites),
            "mlp_sites": len(self.mlp_sites),
            "skipped": len(self.skipped),
            "attention_params": sum(s["params"] for s in self.attention_sites),
            "mlp_params": sum(s["params"] for s in self.mlp_sites),
            "kv_bytes_per_token": sum(s["kv_bytes_per_token"] for s in self.attention_sites),
        }

    def notes(self) -> list[str]:
        notes = []
        if not self.graphs:
            notes.append("nothing was compiled: the function ran no tensor operations Dynamo could capture")
        elif not self.attention_sites and not self.mlp_sites and not self.skipped:
            notes.append("no attention and no MLP found: the graph has no scaled_dot_product_attention call, no "
                         "softmax between matmul(q, k^T) and matmul(p, v), and no projection -> pointwise "
                         "activation -> projection chain; nothing can be rewritten, the model runs unchanged")
        elif not self.attention_sites and not any(s["kind"] == "attention" for s in self.skipped):
            notes.append("no attention found: no scaled_dot_product_attention call and no matmul-softmax-matmul chain")
        partly = sum(not s["expected"] for s in self.skipped)
        if partly:
            notes.append(f"{partly} region(s) only partly understood were skipped and are never rewritten")
        if len(self.skipped) > partly:
            notes.append(f"{len(self.skipped) - partly} region(s) are left as they are by design (the reasons above)")
        if not self.passes:
            notes.append("no compression pass ran: the options request no method, so the graph is unchanged")
        return notes

    def to_dict(self) -> dict:
        return {
            "options": self.options,
            "attention_sites": self.attention_sites,
            "mlp_sites": self.mlp_sites,
            "skipped": self.skipped,
            "passes": self.passes,
            "totals": self.totals(),
            "notes": self.notes(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, default=str)

    def __str__(self) -> str:
        return self.format()

    def format(self, per_layer: bool = False) -> str:
        """The report as text; consecutive layers with identical rows share one row unless ``per_layer``."""
        t = self.totals()
        out = [f"compile_sparse report: {t['graphs']} graph(s), {t['attention_sites']} attention sites, "
               f"{t['mlp_sites']} MLP sites, {t['skipped']} skipped"]
        if self.options.get("recipe"):
            out.append(f"options: recipe {self.options['recipe']}"
                       + (" (the default, as no method was chosen: half the prompt's KV cache, chosen to keep "
                          "perplexity within 2% and facts stated once in the prompt when the question is in it too "
                          "(not one asked after); kv-continuation keeps a quarter within 2% on continued text but "
                          "forgets such facts)"
                          if self.options["recipe"] == DEFAULT_RECIPE else ""))
        for i, g in enumerate(self.graphs):
            out.append(f"-- graph {i}")
            table = format_analysis(g.analysis, per_layer)
            if table:
                out.append(table)
            for p in g.passes:
                counts = ", ".join(f"{k}: {v}" for k, v in p["rewrites"].items()) or "no rewrites"
                out.append(f"pass {p['family']}:{p['method']}: {counts}")
                out.extend(format_sites(p["sites"], per_layer))
                if p.get("kv_cache_bytes"):
                    kv = p["kv_cache_bytes"]
                    saved = 1 - kv["after"] / kv["before"] if kv["before"] else 0.0
                    out.append(f"  KV cache handed back: {format_bytes(kv['before'])} -> {format_bytes(kv['after'])} "
                               f"({saved:.0%} saved)")
                if p.get("params"):
                    params = p["params"]
                    removed = 1 - params["after"] / params["before"] if params["before"] else 0.0
                    out.append(f"  parameters pruned: {params['before']:,} -> {params['after']:,} "
                               f"({removed:.1%} of these sites removed)")
        out.append(f"parameters: attention {t['attention_params']:,}, MLP {t['mlp_params']:,}; "
                   f"KV cache: {format_bytes(t['kv_bytes_per_token'])} per token")
        out.extend(f"note: {n}" for n in self.notes())
        return "\n".join(out)
