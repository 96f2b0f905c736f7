"""``compile_sparse.transform``: the passes alone on a GraphModule, no lowering."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx

from ._torch_internals import tree_map_tensors
from .analysis import example_value
from .backend import transform_graph
from .options import parse_options


class _RecordShapes(fx.Interpreter):
    """Run the graph once and keep each node's result as a meta tensor (shape and dtype, no data)
    in ``node.meta["val"]``, where the analysis reads example values."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        n.meta["val"] = tree_map_tensors(lambda t: torch.empty_like(t, device="meta"), result)
        return result


def transform(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Mapping | str | None = None) -> fx.GraphModule:
    """Analyse ``gm`` and apply the passes ``options`` request; returns the rewritten GraphModule.

    ``gm`` is a graph of functional torch calls: one Dynamo captured, or a ``torch.fx`` trace whose
    modules were traced through (``Tracer.is_leaf_module`` returning False), so that projections
    appear as ``F.linear`` calls on parameters. Nodes without example values get them from one run
    on ``example_inputs``.
    """
    parsed = parse_options(options)
    modules = [n.name for n in gm.graph.nodes if n.op == "call_module"]
    if modules:
        raise ValueError(f"transform needs functional calls, but the graph calls modules {modules[:5]}: trace with a "
                         "torch.fx.Tracer whose is_leaf_module returns False, or capture the graph with Dynamo")
    if any(example_value(n) is None for n in gm.graph.nodes if n.op not in ("output", "get_attr")):
        with torch.no_grad():
            _RecordShapes(gm).run(*example_inputs)
    gm, _ = transform_graph(gm, example_inputs, parsed)
    return gm
