"""Markdown tables for docs/results.md from the JSON that bench/kv_quality.py and bench/kv_speed.py write,
and with ``--plot FILE.png`` the quality rows drawn against the compression ratio, one line per method.

    .venv/bin/python bench/kv_tables.py docs/data/kv_quality.json docs/data/kvpress_quality.json docs/data/kv_speed.json
    .venv/bin/python bench/kv_tables.py docs/data/kv_quality.json --plot docs/kv_quality.png
"""

from __future__ import annotations

import json
import sys


def label(row: dict) -> str:
    """The method, with the parameters a sweep set (beyond method and ratio)."""
    params = {k: v for k, v in row.get("options", {}).get("kv", {}).items() if k not in ("method", "compression_ratio")}
    return row["method"] + "".join(f" {k}={v}" for k, v in params.items())


def quality_table(rows: list[dict]) -> str:
    """One row per method (and swept parameters): geometric-mean ppl ratio to dense at each ratio."""
    ratios = sorted({r["ratio"] for r in rows if r["method"] != "dense"})
    by_method: dict[str, dict[float, float]] = {}
    for r in rows:
        if r["method"] != "dense":
            by_method.setdefault(label(r), {})[r["ratio"]] = r["ppl_ratio"]
    lines = ["| method | " + " | ".join(f"ratio {x}" for x in ratios) + " |",
             "|---|" + "---:|" * len(ratios), "| dense | " + " | ".join("1.0000" for _ in ratios) + " |"]
    for method, values in by_method.items():
        lines.append(f"| {method} | " + " | ".join(f"{values[x]:.4f}" if x in values else "—" for x in ratios) + " |")
    return "\n".join(lines)


def per_document_table(rows: list[dict], ratio: float) -> str:
    chosen = [r for r in rows if r["ratio"] == ratio and r["method"] != "dense" and not r["method"].startswith("kvpress")]
    dense = next(r for r in rows if r["method"] == "dense")["ppl"]
    docs = list(dense)
    lines = ["| document | dense | " + " | ".join(label(r) for r in chosen) + " |",
             "|---|---:|" + "---:|" * len(chosen)]
    for d in docs:
        lines.append(f"| {d} | {dense[d]:.2f} | " + " | ".join(f"{r['ppl'][d]:.2f}" for r in chosen) + " |")
    return "\n".join(lines)


def speed_tables(data: dict) -> str:
    """The decode table (the three sides' medians, ratios and a spread: the ratio's own, taken round
    by round, where the file has it, else the largest interquartile spread of the three sides) and
    the prefill table."""
    lines = ["| batch | method | KV MB dense -> kept | dense step ms | ideal step ms | sparse step ms | sparse / ideal | "
             "spread | speedup vs dense |", "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in data["decode"]:
        lines.append(f"| {r['batch']} | {r['method']} | {r['kv_bytes_dense'] / 1e6:.0f} -> {r['kv_bytes_sparse'] / 1e6:.0f} | "
                     f"{r['dense_ms']:.1f} | {r['ideal_ms']:.1f} | {r['sparse_ms']:.1f} | {r['vs_ideal']:.3f} | "
                     f"{r.get('ratio_spread', {}).get('vs_ideal', max(r['spread'].values())):.1%} | {r['speedup']:.2f}x |")
    tokens = {r["tokens"] for r in data["prefill"]}
    lines += ["", f"| method | dense {'/'.join(map(str, sorted(tokens)))}-token prefill ms | with scoring + eviction ms | "
              "sparse / dense | spread |", "|---|---:|---:|---:|---:|"]
    for r in data["prefill"]:
        lines.append(f"| {r['method']} | {r['dense_ms']:.0f} | {r['sparse_ms']:.0f} | {r['sparse_ms'] / r['dense_ms']:.3f} | "
                     f"{max(r['spread'].values()):.0%} |")
    return "\n".join(lines)


def main() -> None:
    args = sys.argv[1:]
    plot = args[args.index("--plot") + 1] if "--plot" in args else None
    paths = [a for a in args if a not in ("--plot", plot)]
    rows: list[dict] = []
    for path in paths:
        data = json.load(open(path))
        if "rows" in data:
            rows += [r for r in data["rows"] if r["method"] != "dense" or not any(x["method"] == "dense" for x in rows)]
            print(f"<!-- {path}: {data['command']} ({data['seconds']} s) -->")
        else:
            print(f"<!-- {path}: {data['command']} -->\n")
            print(speed_tables(data))
    if rows:
        print(quality_table(rows))
        if any(r["method"] == "truncate" for r in rows):
            print()
            print(per_document_table(rows, 0.75))
    if plot:
        from compile_sparse.plot import quality_plot

        points = [{"series": label(r), "x": r["ratio"], "y": r["ppl_ratio"]} for r in rows
                  if r["method"] != "dense" and not r["method"].startswith("kvpress")]
        quality_plot(points, plot, title="SmolLM2-135M, ctx-continuation: KV-cache eviction",
                     x_label="compression ratio (fraction of the prompt's KV cache evicted)", y_label="ppl / dense ppl")
        print(f"wrote {plot}")


if __name__ == "__main__":
    main()
