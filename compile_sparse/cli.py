"""``compile-sparse``: the command line.

    compile-sparse inspect MODEL [--options JSON] [--json FILE] [--seq-len N]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import models
from .explain import explain


def _inspect(args: argparse.Namespace) -> int:
    model, tokenizer = models.load(args.model)
    inputs = models.sample_inputs(args.model, model, tokenizer, seq_len=args.seq_len)
    report = explain(model, options=args.options, **inputs)
    print(report)
    if args.json:
        data = {"model": args.model, **report.to_dict()}
        Path(args.json).write_text(json.dumps(data, indent=1, default=str))
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="compile-sparse", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the backend does")
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="show the attention / MLP sites found and what the options would change")
    inspect.add_argument("model", help=f"a zoo model: {', '.join(models.ZOO)}")
    inspect.add_argument("--options", default=None, help="the torch.compile options dict, as JSON")
    inspect.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON")
    inspect.add_argument("--seq-len", type=int, default=32, help="tokens in the sample input (default 32)")
    inspect.set_defaults(run=_inspect)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if args.model not in models.ZOO:
        parser.error(f"unknown model {args.model!r}; zoo: {', '.join(models.ZOO)}")
    try:
        return args.run(args)
    except (ValueError, ModuleNotFoundError) as err:
        print(f"compile-sparse: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
