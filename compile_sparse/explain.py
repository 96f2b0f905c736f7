"""``compile_sparse.explain``: what the analysis found and what each pass did, as a Report."""

from __future__ import annotations

from typing import Any, Callable

import torch

from .backend import PassError, lower, transform_graph
from .options import parse_options
from .report import GraphReport, Report


def explain(model_or_fn: Callable, *args: Any, options: dict | str | None = None, **kwargs: Any) -> Report:
    """Run ``model_or_fn(*args, **kwargs)`` once under Dynamo with the sparse pipeline (lowered
    eagerly, so it is cheap) and report the sites found and what each pass did to them; the
    report's ``output`` is what the rewritten call returned."""
    parsed = parse_options(options)
    graphs: list[GraphReport] = []

    def backend(gm, example_inputs):
        gm, report = transform_graph(gm, example_inputs, parsed)
        graphs.append(report)
        return lower(gm, example_inputs, "eager")

    try:
        with torch.no_grad():
            output = torch.compile(model_or_fn, backend=backend)(*args, **kwargs)
    except Exception as err:
        # Dynamo wraps what a backend raises; hand the pass's own error to the caller.
        inner = getattr(err, "inner_exception", None)
        if isinstance(inner, (PassError, ValueError)):
            raise inner from None
        raise
    return Report(options=parsed.to_dict(), graphs=graphs, output=output)
