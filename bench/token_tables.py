"""Markdown tables for docs/results.md from the JSON that bench/token_quality.py, token_speed.py and
token_minilm.py write (any mix of files; each is recognized by its protocol).

    .venv/bin/python bench/token_tables.py docs/data/token_quality*.json docs/data/token_speed.json docs/data/token_minilm.json
"""

from __future__ import annotations

import json
import sys


def label(row: dict) -> str:
    """LazyLLM's schedule and the parameters set beyond it; a baseline's name and ratio."""
    if row["method"] != "lazyllm":
        return f"{row['method']} {row['ratio']:.4f}"
    params = {k: v for k, v in row["options"]["tokens"].items() if k not in ("method", "layers", "keep_ratios")}
    return f"lazyllm {row['schedule']}" + "".join(f" {k}={v}" for k, v in params.items())


def quality_table(rows: list[dict]) -> str:
    lines = ["| setting | KV ratio | ppl ratio | vs truncate |", "|---|---:|---:|---:|"]
    truncate = {r["ratio"]: r["ppl_ratio"] for r in rows if r["method"] == "truncate"}
    seen = set()
    for r in rows:
        if r["method"] == "dense" or label(r) in seen:
            continue
        seen.add(label(r))
        base = next((v for ratio, v in truncate.items() if abs(ratio - r["ratio"]) < 0.002), None)
        versus = f"{r['ppl_ratio'] / base:.4f}" if base else "—"
        lines.append(f"| {label(r)} | {r['ratio']:.4f} | {r['ppl_ratio']:.4f} | {versus} |")
    return "\n".join(lines)


def speed_table(data: dict) -> str:
    lines = ["| schedule | tokens | cache tokens (first / last layer) | dense ms | pruned ms | speedup | FLOP bound |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in data["rows"]:
        lines.append(f"| {r['schedule']} | {r['length']} | {r['cache_tokens'][0]} / {r['cache_tokens'][-1]} | "
                     f"{r['dense_ms']:.0f} | {r['sparse_ms']:.0f} | {r['speedup']:.2f}x | {r['flop_bound']:.2f}x |")
    return "\n".join(lines)


def minilm_table(rows: list[dict], data: dict) -> str:
    lines = [f"{data['sentences']} sentences of {data['speech']}", "",
             "| setting | tokens per layer vs dense | mean cosine | min cosine |", "|---|---:|---:|---:|"]
    seen = set()
    for r in sorted(rows, key=lambda r: -r["token_fraction"]):
        if r["setting"] in seen:
            continue
        seen.add(r["setting"])
        lines.append(f"| {r['setting']} | {r['token_fraction']:.3f} | {r['mean_cosine']:.4f} | {r['min_cosine']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    quality: list[dict] = []
    minilm: list[dict] = []
    for path in sys.argv[1:]:
        data = json.load(open(path))
        if data.get("protocol") == "ctx-continuation":
            quality += data["rows"]
        elif data.get("protocol") == "minilm":
            minilm += data["rows"]
            minilm_data = data
        else:
            print(speed_table(data) + "\n")
    if minilm:
        print(minilm_table(minilm, minilm_data) + "\n")
    if quality:
        print(quality_table(quality))


if __name__ == "__main__":
    main()
