"""Markdown tables for docs/results.md from retrieval JSON: what ``compile-sparse eval --protocol
retrieval --json`` writes (ours, dense, truncation) and what bench/kv_retrieval.py writes (kvpress).
One table per retrieval setting and task (and the task average when there are several, for the
methods run on every task): accuracy per method at each KV ratio. With ``--by-task RATIO``, one
table per setting instead: method x task at that ratio, and the average over the tasks.

    .venv/bin/python bench/retrieval_tables.py docs/data/retrieval_*.json docs/data/kvpress_retrieval*.json
    .venv/bin/python bench/retrieval_tables.py --by-task 0.75 FILES...

Files: the JSON of ``compile-sparse eval --protocol retrieval``, of bench/kv_retrieval.py, or the
lines bench/kv_retrieval.py prints (``kvpress  tova 0.75  accuracy 0.500 {'single_needle': 0.5}``,
a run stopped before its JSON) in a .log file.
"""

from __future__ import annotations

import argparse
import ast
import json


def entries(path: str) -> list[tuple[str, str, float, dict[str, float]]]:
    """(retrieval setting, method, ratio, accuracy per task) of one file, dense and truncation included."""
    if path.endswith(".log"):  # bench/kv_retrieval.py's lines: query-aware, its default setting
        print(f"<!-- {path}: bench/kv_retrieval.py's printed lines -->")
        rows = [line.split(None, 5) for line in open(path) if line.startswith("kvpress")]
        return [("query-aware", f"kvpress:{r[1]}", float(r[2]), ast.literal_eval(r[5])) for r in rows]
    data = json.load(open(path))
    print(f"<!-- {path}: {data.get('command', 'compile-sparse eval ... --protocol retrieval')} -->")
    if "rows" in data:  # bench/kv_retrieval.py
        return [(data["setting"], r["method"], r["ratio"], r["tasks"]) for r in data["rows"]]
    out = []
    for row in data["settings"]:
        kv = row["options"].get("kv", {})
        params = "".join(f" {k}={v}" for k, v in kv.items() if k not in ("method", "compression_ratio")) \
            if isinstance(kv, dict) else ""
        method = (kv.get("method", row["setting"]) if isinstance(kv, dict) else str(kv)) + params
        ratio = round(row["kv_removed"], 2)
        tasks = row["tasks"]
        out.append((row["retrieval_setting"], method, ratio, {t: v["accuracy"] for t, v in tasks.items()}))
        out.append((row["retrieval_setting"], "dense", 0.0, {t: v["accuracy_dense"] for t, v in tasks.items()}))
        if row["accuracy_truncate"] is not None:
            out.append((row["retrieval_setting"], "truncate", ratio, {t: v["accuracy_truncate"] for t, v in tasks.items()}))
    return out


def merged(found: list[tuple[str, float, dict[str, float]]]) -> tuple[list[float], dict[str, dict[float, dict[str, float]]]]:
    """The ratios, and per method and ratio the accuracy per task, the files' results merged
    (dense, at ratio 0, stands at every ratio)."""
    ratios = sorted({r for m, r, _ in found if m != "dense"})
    out: dict[str, dict[float, dict[str, float]]] = {}
    for method, ratio, accuracy in found:
        for x in (ratios if method == "dense" else [ratio]):
            out.setdefault(method, {}).setdefault(x, {}).update(accuracy)
    return ratios, out


def mean_over(accuracy: dict[str, float], tasks: list[str]) -> float | None:
    """The average over ``tasks``, None unless the method was run on every one."""
    return sum(accuracy[t] for t in tasks) / len(tasks) if all(t in accuracy for t in tasks) else None


def table(found: list[tuple[str, float, dict[str, float]]], task: str, tasks: list[str]) -> str:
    """One task's table, or with ``task`` "average" the mean over ``tasks``."""
    ratios, results = merged(found)
    values: dict[str, dict[float, float]] = {}
    for method, by_ratio in results.items():
        for x, accuracy in by_ratio.items():
            score = mean_over(accuracy, tasks) if task == "average" else accuracy.get(task)
            if score is not None:
                values.setdefault(method, {})[x] = score
    order = ["dense", "truncate"] + sorted(m for m in values if m not in ("dense", "truncate"))
    lines = [f"| {task} | " + " | ".join(f"ratio {x}" for x in ratios) + " |", "|---|" + "---:|" * len(ratios)]
    for method in (m for m in order if m in values):
        lines.append(f"| {method} | " + " | ".join(f"{values[method][x]:.2f}" if x in values[method] else "—"
                                                    for x in ratios) + " |")
    return "\n".join(lines)


def by_task(found: list[tuple[str, float, dict[str, float]]], ratio: float) -> str:
    """Method x task at one ratio, with the average where a method has every task."""
    _, results = merged(found)
    at = {m: by_ratio[ratio] for m, by_ratio in results.items() if ratio in by_ratio}
    tasks = sorted({t for accuracy in at.values() for t in accuracy})
    average = {m: mean_over(accuracy, tasks) for m, accuracy in at.items()}
    order = ["dense", "truncate"] + sorted((m for m in at if m not in ("dense", "truncate")),
                                           key=lambda m: (-(average[m] if average[m] is not None else -1), m))
    lines = [f"| ratio {ratio} | " + " | ".join(tasks) + " | average |", "|---|" + "---:|" * (len(tasks) + 1)]
    for method in (m for m in order if m in at):
        cells = [f"{at[method][t]:.2f}" if t in at[method] else "—" for t in tasks]
        cells.append("—" if average[method] is None else f"{average[method]:.2f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--by-task", type=float, default=None, metavar="RATIO")
    args = parser.parse_args()
    found = [e for path in args.files for e in entries(path)]
    for setting in sorted({e[0] for e in found}):
        chosen = [e[1:] for e in found if e[0] == setting]
        if args.by_task is not None:
            print(f"\n{setting}:\n")
            print(by_task(chosen, args.by_task))
            continue
        tasks = sorted({t for _, _, tasks in chosen for t in tasks})
        for task in tasks + (["average"] if len(tasks) > 1 else []):
            print(f"\n{setting}:\n")
            print(table(chosen, task, tasks))


if __name__ == "__main__":
    main()
