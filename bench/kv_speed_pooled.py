"""KV-eviction decode speed pooled over several processes: ``bench/kv_speed.py`` run in turn in
``--processes`` fresh processes (each compiles its own steps and allocates its own caches), every
round's ratio of every process pooled into one median and spread per method and batch.

One process's median ratio also carries what differs between processes (compiled code, where the
caches landed in memory), which more rounds in that process do not average out; pooling the rounds
of several processes does. Each process's own median is reported beside the pooled one, and
``between_processes`` is their range over the pooled median.

    OMP_NUM_THREADS=1 .venv/bin/python bench/kv_speed_pooled.py --methods tova h2o hitkv --processes 4 \\
        --json docs/data/kv_speed_pooled_run1.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from compile_sparse.timing import ratio_summary, round_ratios

SPEED = Path(__file__).with_name("kv_speed.py")


def pooled(runs: list[dict]) -> list[dict]:
    """Per (method, batch) of ``kv_speed.py``'s JSON outputs ``runs``: the pooled median and spread
    of every round's sparse / ideal (``vs_ideal``) and dense / sparse (``speedup``) ratio, each
    process's own median of them, and ``between_processes``: the range of the processes' medians of
    ``vs_ideal`` over the pooled one."""
    keys = list(dict.fromkeys((row["method"], row["batch"]) for run in runs for row in run["decode"]))
    rows = []
    for method, batch in keys:
        per_process = [row["rounds_ms"] for run in runs for row in run["decode"]
                       if (row["method"], row["batch"]) == (method, batch)]
        ratios = {"vs_ideal": [round_ratios(r["sparse"], r["ideal"]) for r in per_process],
                  "speedup": [round_ratios(r["dense"], r["sparse"]) for r in per_process]}
        summary = {name: ratio_summary([x for process in values for x in process]) for name, values in ratios.items()}
        medians = {name: [ratio_summary(process)["ratio"] for process in values] for name, values in ratios.items()}
        rows.append({"method": method, "batch": batch, "processes": len(per_process),
                     "rounds": sum(len(process) for process in ratios["vs_ideal"]),
                     **{name: s["ratio"] for name, s in summary.items()},
                     "ratio_spread": {name: s["spread"] for name, s in summary.items()},
                     "process_medians": medians,
                     "between_processes": (max(medians["vs_ideal"]) - min(medians["vs_ideal"])) / summary["vs_ideal"]["ratio"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["tova", "h2o", "hitkv"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1])
    parser.add_argument("--processes", type=int, default=4, help="fresh processes, run one after another (>= 2)")
    parser.add_argument("--rounds", type=int, default=60, help="decode rounds per process")
    parser.add_argument("--ratio", type=float, default=0.75)
    parser.add_argument("--context", type=int, default=4096, help="prompt tokens")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.processes < 2:
        parser.error(f"--processes must be at least 2 to pool over processes, got {args.processes}")
    runs = []
    with tempfile.TemporaryDirectory(prefix="kv_speed_pooled_") as folder:
        for index in range(args.processes):
            path = Path(folder) / f"process{index}.json"
            command = [sys.executable, str(SPEED), "--methods", *args.methods, "--batches", *map(str, args.batches),
                       "--prefill-methods", "--rounds", str(args.rounds), "--ratio", str(args.ratio),
                       "--context", str(args.context), "--json", str(path)]
            print(f"process {index + 1}/{args.processes}: {shlex.join(command)}", flush=True)
            subprocess.run(command, check=True)
            runs.append(json.loads(path.read_text()))
    rows = pooled(runs)
    for row in rows:
        medians = ", ".join(f"{m:.3f}" for m in row["process_medians"]["vs_ideal"])
        print(f"batch {row['batch']} {row['method']:>14}: {row['vs_ideal']:.3f}x the ideal over {row['rounds']} rounds "
              f"(spread {row['ratio_spread']['vs_ideal']:.1%}; processes {medians}: range "
              f"{row['between_processes']:.1%}), {row['speedup']:.2f}x faster than dense", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": shlex.join(sys.argv), "model": runs[0]["model"], "device": runs[0]["device"],
                       "decode": rows, "processes": runs}, f, indent=1)


if __name__ == "__main__":
    main()
