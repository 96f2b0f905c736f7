"""Find the attention and MLP regions of an FX graph captured by Dynamo.

Everything here reads the torch-level graph (``torch._C._nn.linear``, ``scaled_dot_product_attention``,
``torch.matmul``, ``softmax``), never ATen, so one analysis serves every device. A site is recorded
only when every piece the passes need was found; a region that looks like attention or an MLP but
is only partly understood becomes a ``SkippedRegion`` with the reason, and no pass ever touches it.

The package: ``ops`` (op vocabulary, node helpers), ``sites`` (the records), ``attention`` and
``mlp`` (region matching), ``token_axes`` (where the tokens of an input run through a graph).
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Sequence

import torch.fx as fx

from .attention import AnalysisError, attention_site
from .mlp import expert_regions, mlp_site
from .ops import SOFTMAX, example_value, graph_outputs, is_parameter, module_path, op_name
from .sites import AttentionSite, CacheSlot, GraphAnalysis, LinearOp, MLPSite, SkippedRegion, as_linear
from .token_axes import TokenAxes, token_axes

__all__ = ["AnalysisError", "AttentionSite", "CacheSlot", "GraphAnalysis", "LinearOp", "MLPSite", "SkippedRegion",
           "TokenAxes", "analyze", "as_linear", "example_value", "is_parameter", "token_axes"]

log = logging.getLogger("compile_sparse")


def _attention_candidates(graph: fx.Graph) -> Iterable[fx.Node]:
    for node in graph.nodes:
        if op_name(node) == "scaled_dot_product_attention" or op_name(node) in SOFTMAX:
            yield node


def analyze(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> GraphAnalysis:
    """Find one AttentionSite per attention block and one MLPSite per MLP in ``gm``.

    ``example_inputs`` are the real tensors the graph's placeholders stand for (Dynamo hands them
    to the backend); they are used only to evaluate attention masks.
    """
    result = GraphAnalysis(inputs=example_inputs)
    outputs = graph_outputs(gm.graph)
    for node in _attention_candidates(gm.graph):
        try:
            site = attention_site(gm, node, example_inputs, outputs, len(result.attention))
        except AnalysisError as err:
            result.skipped.append(SkippedRegion("attention", node.name, module_path(node), str(err), err.expected))
            continue
        if site is not None:
            result.attention.append(site)
    attention_projections = {id(p.node) for s in result.attention for p in (s.q, s.k, s.v, s.o) if p is not None}
    for node in gm.graph.nodes:
        down = as_linear(node)
        if down is None or id(node) in attention_projections:
            continue
        site = mlp_site(down, len(result.mlp))
        if isinstance(site, MLPSite):
            result.mlp.append(site)
        elif isinstance(site, SkippedRegion):
            result.skipped.append(site)
    result.skipped += expert_regions(gm.graph)
    if len({site.stack for site in result.attention + result.mlp}) == 1:
        for site in result.attention + result.mlp:  # one stack (a decoder-only or encoder-only model): no prefix
            site.stack = ""
    log.info("analysis: %d attention sites, %d MLP sites, %d skipped regions",
             len(result.attention), len(result.mlp), len(result.skipped))
    return result

