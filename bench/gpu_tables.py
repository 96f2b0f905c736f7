"""Markdown tables from bench/gpu_kernels.py's JSON, for docs/results.md.

    python bench/gpu_tables.py docs/data/gpu_kernels.json --kinds decode compress
    python bench/gpu_tables.py docs/data/gpu_prefill.json --kinds prefill
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gpu_kernels import markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path)
    parser.add_argument("--kinds", nargs="+", default=["decode", "compress", "prefill"])
    args = parser.parse_args()
    data = json.loads(args.json.read_text())
    print(f"Command: `{data['command']}`\n")
    print(markdown(data, [row for row in data["rows"] if row["kind"] in args.kinds]))


if __name__ == "__main__":
    main()
