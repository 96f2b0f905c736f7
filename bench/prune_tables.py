"""Markdown tables for docs/results.md from the JSON that bench/prune_quality.py and
bench/prune_speed.py write.

    .venv/bin/python bench/prune_tables.py docs/data/prune_quality.json [more quality JSON ...] docs/data/prune_speed.json
"""

from __future__ import annotations

import json
import sys

SETTINGS = {"mlp20": "MLP 20%", "mlp40": "MLP 40%", "heads3of9": "heads 3 of 9", "nm2:4": "2:4 (masked)"}


def quality_table(rows: list[dict]) -> str:
    """One row per method and allocation: ppl ratio to dense (parameters kept) per setting; a later
    file's row replaces an earlier one for the same method, allocation and setting."""
    dense = next(r for r in rows if r["method"] == "dense")
    cells: dict[str, dict[str, str]] = {}
    for r in rows:
        if r["method"] == "dense":
            continue
        label = r["method"] + ("" if r.get("allocation", "uniform") == "uniform" else f" ({r['allocation']})")
        cells.setdefault(label, {})[r["setting"]] = f"{r['ppl_ratio']:.3f} ({r['params'] / 1e6:.2f}M)"
    settings = [s for s in SETTINGS if any(s in c for c in cells.values())]
    lines = ["| method | " + " | ".join(SETTINGS[s] for s in settings) + " |", "|---|" + "---:|" * len(settings),
             "| dense | " + " | ".join(f"1.000 ({dense['params'] / 1e6:.2f}M)" for _ in settings) + " |"]
    for label, by_setting in cells.items():
        lines.append(f"| {label} | " + " | ".join(by_setting.get(s, "—") for s in settings) + " |")
    return "\n".join(lines)


def speed_table(data: dict) -> str:
    ms = data["prefill_ms"]
    return "\n".join([
        "| unpruned ms | pruned (ours) ms | ideal (plain model at the pruned width) ms | ours vs ideal (speed) | speedup over unpruned | ideal over unpruned |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {ms['dense']:.0f} | {ms['pruned']:.0f} | {ms['ideal']:.0f} | {data['pruned_vs_ideal_speed']:.3f}x | "
        f"{data['speedup_over_dense']:.2f}x | {data['ideal_speedup_over_dense']:.2f}x |"])


def main() -> None:
    rows: list[dict] = []
    for path in sys.argv[1:]:
        data = json.load(open(path))
        if "rows" in data:
            rows += data["rows"]
        else:
            print(speed_table(data), end="\n\n")
    if rows:
        print(quality_table(rows))


if __name__ == "__main__":
    main()
