"""The report types: what one pass did (PassResult), what the analysis found and the passes did to
one compiled graph (GraphReport), and the Report ``compile_sparse.explain`` returns."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .recipes import DEFAULT_RECIPE


@dataclass
class PassResult:
    """What one pass did: ``rewrites`` counts rewritten sites per kind of rewrite, ``sites`` says
    what changed per site (``{"layer 3 attention": "kept 256 of 1024 tokens"}``), ``kv_cache_bytes``
    the KV cache this graph hands back, before and after the pass (``{"before": n, "after": m}``,
    empty when the pass does not touch the cache or the sizes are symbolic), ``params`` the
    parameters of the sites it prunes, before and after (empty for passes that prune nothing)."""

    method: str
    family: str
    rewrites: dict[str, int] = field(default_factory=dict)
    sites: dict[str, str] = field(default_factory=dict)
    kv_cache_bytes: dict[str, int] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)

    def count(self, kind: str, n: int = 1) -> None:
        """Add ``n`` rewrites of ``kind``."""
        self.rewrites[kind] = self.rewrites.get(kind, 0) + n

    def to_dict(self) -> dict:
        return {"method": self.method, "family": self.family, "rewrites": dict(self.rewrites),
                "sites": dict(self.sites), "kv_cache_bytes": dict(self.kv_cache_bytes), "params": dict(self.params)}


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


def format_analysis(analysis: dict) -> str:
    """A plain-text table of one graph's sites."""
    lines = []
    att = analysis["attention_sites"]
    if att:
        lines.append(f"{'layer':>5}  {'attention':<18} {'heads q/kv':>10} {'head_dim':>8} {'causal':>6} "
                     f"{'q_len':>6} {'kv_len':>6}  {'cache':<11} {'params':>10}")
        for s in att:
            cache = s["cache"]["kind"] if s["cache"] else "-"
            lines.append(f"{s['layer']:>5}  {s['form'] + (' qkv' if s['qkv_fused'] else ''):<18} "
                         f"{str(s['num_heads']) + '/' + str(s['num_kv_heads']):>10} {s['head_dim']:>8} "
                         f"{str(s['causal']):>6} {str(s['q_len']):>6} {str(s['kv_len']):>6}  {cache:<11} {s['params']:>10,}")
    mlp = analysis["mlp_sites"]
    if mlp:
        lines.append(f"{'layer':>5}  {'mlp':<18} {'activation':>10} {'hidden':>8} {'inter.':>6} {'params':>26}")
        for s in mlp:
            lines.append(f"{s['layer']:>5}  {'gated' if s['gated'] else 'plain':<18} {s['activation']:>10} "
                         f"{s['hidden_size']:>8} {s['intermediate_size']:>6} {s['params']:>26,}")
    for s in analysis["skipped"]:
        lines.append(f"skipped {s['kind']} at {s['node']} ({s['module'] or 'no module'}): {s['reason']}")
    return "\n".join(lines)


@dataclass
class Report:
    """What compile_sparse found and did, per compiled graph, with totals.

    ``str(report)`` is a table; ``report.to_dict()`` is JSON-ready.
    """

    options: dict
    graphs: list[GraphReport]

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
        elif not self.attention_sites:
            notes.append("no attention found: no scaled_dot_product_attention call and no matmul-softmax-matmul chain")
        if self.skipped:
            notes.append(f"{len(self.skipped)} region(s) only partly understood were skipped and are never rewritten")
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
        t = self.totals()
        out = [f"compile_sparse report: {t['graphs']} graph(s), {t['attention_sites']} attention sites, "
               f"{t['mlp_sites']} MLP sites, {t['skipped']} skipped"]
        if self.options.get("recipe"):
            out.append(f"options: recipe {self.options['recipe']}"
                       + (" (the default, as no method was chosen)" if self.options["recipe"] == DEFAULT_RECIPE else ""))
        for i, g in enumerate(self.graphs):
            out.append(f"-- graph {i}")
            table = format_analysis(g.analysis)
            if table:
                out.append(table)
            for p in g.passes:
                counts = ", ".join(f"{k}: {v}" for k, v in p["rewrites"].items()) or "no rewrites"
                out.append(f"pass {p['family']}:{p['method']}: {counts}")
                out.extend(f"  {site}: {what}" for site, what in p["sites"].items())
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
