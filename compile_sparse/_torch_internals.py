"""The one module that touches private torch APIs (``torch._inductor``, ``torch._dynamo``,
``torch.utils._pytree``, ``torch._subclasses``, SymInt internals)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_with_inductor(gm: fx.GraphModule, example_inputs: Sequence[Any], mode: str | None,
                          cache_key: str) -> Callable:
    """Lower a (rewritten) Dynamo graph through Inductor, as ``backend="inductor"`` would.

    The functions of ours the passes call in the graph (``package`` modules) are marked cacheable
    under ``cache_key`` (a digest of their source), so that AOTAutograd's on-disk cache holds the
    graph as it holds a plain Inductor one: without it every compile retraces the graph through
    AOTAutograd and Inductor's joint passes, warm cache or not (most of a warm compile)."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    if mode is not None and mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    package = __name__.split(".")[0]
    for node in gm.graph.nodes:
        target = getattr(node.target, "func", node.target)  # a functools.partial's function
        if node.op == "call_function" and getattr(target, "__module__", "").startswith(package + "."):
            node.meta["is_wrapped"] = True  # AOTAutograd's cache check: keyed by user_cache_hash
            node.meta["user_cache_hash"] = cache_key
    _name_added_attributes(gm)
    patches = dict(list_mode_options(mode)) if mode else {}
    if patches.get("triton.cudagraphs"):
        # On an H200 (torch 2.11) the KV decode step's first CUDA-graph recording crashed (a
        # segfault in a Triton launch of a graph partition) over StaticCache buffers allocated in
        # the compiled prefill; with partitions off it ran (docs/results.md, the CUDA serving path).
        patches["graph_partition"] = False
    return compile_fx(gm, list(example_inputs), config_patches=patches)


def copy_dynamo_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of a graph Dynamo captured that keeps what Dynamo attached for AOTAutograd: the meta,
    the parameters' sources (``_param_name_to_source``) and each placeholder's source
    (``_dynamo_source``). Without them AOTAutograd takes the graph for one Dynamo did not capture
    and marks no input static for CUDA graphs: ``mode="reduce-overhead"`` would copy every weight
    into the graph's buffers at each replay, and skip capture for a StaticCache written in place."""
    import copy

    copied = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    copied.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        copied._param_name_to_source = dict(gm._param_name_to_source)
    for old, new in zip(gm.graph.find_nodes(op="placeholder"), copied.graph.find_nodes(op="placeholder")):
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    return copied


def _name_added_attributes(gm: fx.GraphModule) -> None:
    """Parameters and buffers a pass registered on a Dynamo graph (pruned weights) get a source of
    their own beside Dynamo's: AOTAutograd asks one of every parameter of a graph that has
    sources (see copy_dynamo_graph), and marks them static for CUDA graphs."""
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is None:
        return
    from torch._dynamo.source import ConstantSource

    for name, _ in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        sources.setdefault(name, ConstantSource(f"compile_sparse.{name}"))


def mark_added_input(node: fx.Node) -> None:
    """A placeholder a pass added (no source in the user's code): AOTAutograd reads a source from
    every placeholder of a Dynamo graph (see copy_dynamo_graph)."""
    node._dynamo_source = None


def call_compiled_once(gm: fx.GraphModule, fn: Callable, args: Sequence[fx.Node], kwargs: dict[str, Any],
                       name: str) -> fx.Node:
    """A node of ``gm`` that calls ``fn(*args, **kwargs)`` (tensor arguments, constant keywords),
    lowered by Inductor once for every call in the graph of the same ``fn`` over arguments of the
    same sizes, devices and dtypes: an ``invoke_subgraph`` (what ``torch.compiler.nested_compile_region``
    makes under Dynamo) of ``fn`` traced to aten ops. A step every layer repeats (the KV decode step:
    58-91 aten ops) is then traced, lowered and scheduled once instead of once per layer. In-place
    writes to an argument stay in place (AOTAutograd functionalizes them and Inductor writes back).

    ``fn`` is traced on fake tensors whose sizes are symbolic where the arguments' are. Where the
    trace assumed only that sizes are equal (its guards), that is added to the graph's guards, on each
    call's own sizes, as tracing ``fn`` inline would; where it fixed or bounded a size, the node is a
    plain call of ``fn`` (the graph's own trace then guards it, and a graph run for other sizes
    cannot meet a subgraph traced for one)."""
    import functools
    import hashlib

    constants = (str, int, float, bool, type(None))
    bad = {key: value for key, value in kwargs.items() if not isinstance(value, constants)}
    if bad:
        raise TypeError(f"call_compiled_once takes constant keywords (str, int, float, bool, None), got {bad!r}")
    values = [a.meta.get("example_value", a.meta.get("val")) for a in args]
    if not all(isinstance(v, torch.Tensor) for v in values):
        return gm.graph.call_function(fn, tuple(args), kwargs)
    layout = [(tuple(s if isinstance(s, int) else "symbolic" for s in v.shape), v.dtype, str(v.device)) for v in values]
    step = functools.partial(fn, **kwargs)
    # The name is part of the graph AOTAutograd's and Inductor's on-disk caches key on: made of what
    # is the same in every process (not the function's address), so that a later process loads the graph.
    described = repr((fn.__module__, fn.__qualname__, sorted(kwargs.items()), layout))
    identifier = f"{name}_{hashlib.sha1(described.encode()).hexdigest()[:12]}"
    traced = gm.meta.setdefault("compile_sparse_subgraphs", {})  # identifier -> trace, for the graph's other calls
    if identifier not in traced:
        traced[identifier] = _trace_with_guards(step, values)
    symbols, guards = traced[identifier].meta["size_guards"]
    if not all(_same_sizes(guard) for guard in guards):  # the trace fixed a size: the graph's own trace decides
        return gm.graph.call_function(fn, tuple(args), kwargs)
    if not hasattr(gm, identifier):
        gm.add_submodule(identifier, traced[identifier])
    if guards:
        sizes = {symbol: values[i].shape[dim].node for symbol, (i, dim) in symbols.items()}
        shape_env = next(iter(sizes.values())).shape_env
        replace = {symbol: node.expr for symbol, node in sizes.items()}
        for guard in guards:
            shape_env.evaluate_expr(guard.xreplace(replace))
    subgraph = gm.graph.get_attr(identifier)
    return gm.graph.call_function(torch.ops.higher_order.invoke_subgraph, (subgraph, identifier, *args))


def _same_sizes(guard: Any) -> bool:
    """A guard that only says two sizes are equal (the K and V caches' lengths)."""
    import sympy

    return isinstance(guard, sympy.Eq) and all(isinstance(side, sympy.Symbol) for side in guard.args)


def _trace_with_guards(fn: Callable, values: Sequence[torch.Tensor]) -> fx.GraphModule:
    """``fn`` traced to aten ops (make_fx) on fake tensors of ``values``' sizes, symbolic where theirs
    are. Its meta ``size_guards``: which argument size each symbol of the trace stands for, and the
    guards the trace added on them."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    shape_env = ShapeEnv()
    mode = FakeTensorMode(shape_env=shape_env)
    fakes, symbols = [], {}
    for i, value in enumerate(values):
        dynamic = [DimDynamic.STATIC if isinstance(s, int) else DimDynamic.DYNAMIC for s in value.shape]
        example = torch.empty_strided([size_hint(s) for s in value.shape], [size_hint(s) for s in value.stride()],
                                      dtype=value.dtype, device=value.device)
        fake = mode.from_tensor(example, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dynamic))
        symbols.update({size.node.expr: (i, dim) for dim, size in enumerate(fake.shape)
                        if isinstance(size, torch.SymInt)})
        fakes.append(fake)
    traced = make_fx(fn, tracing_mode="fake")(*fakes)
    traced.meta["size_guards"] = (symbols, [guard.expr for guard in shape_env.guards])
    return traced


def is_fake(value: Any) -> bool:
    """``value`` is a fake tensor (an example value Dynamo's fake mode made)."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(value, FakeTensor)


def run_on_examples(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` on example values: inside Dynamo's fake mode when they are fake tensors (so that
    tensors ``fn`` creates are fake too), directly for real or meta tensors."""
    from torch._subclasses.fake_tensor import FakeTensor

    mode = next((a.fake_mode for a in args if isinstance(a, FakeTensor)), None)
    if mode is None:
        return fn(*args, **kwargs)
    with mode:
        return fn(*args, **kwargs)


def parameter_name(placeholder: fx.Node) -> str | None:
    """The module-relative name of the parameter a Dynamo placeholder stands for
    (``model.layers.0.mlp.down_proj.weight``), from the source Dynamo recorded; None if unknown."""
    import re

    grapharg = placeholder.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return None
    parts = re.findall(r"\._(?:modules|parameters|buffers)\['([^']+)'\]", source.name)
    return ".".join(parts) or None


def propagate_shapes(gm: fx.GraphModule) -> None:
    """Recompute every node's example value after a pass changed shapes (sliced weights), in the
    fake mode Dynamo used, so symbolic sizes stay symbolic. Writes ``example_value`` and ``val``."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    from torch._subclasses.fake_tensor import FakeTensorMode

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = [n.meta.get("example_value", n.meta.get("val")) for n in placeholders]
    mode = next((v.fake_mode for v in values if isinstance(v, FakeTensor)), None)
    if mode is None:  # a torch.fx trace (compile_sparse.transform): meta example values, static shapes
        if not all(isinstance(v, torch.Tensor) for v in values):
            raise RuntimeError("the graph's placeholders carry no example values to propagate shapes from")
        mode = FakeTensorMode()
        values = [mode.from_tensor(torch.empty(v.shape, dtype=v.dtype)) for v in values]
    allowed = mode.allow_non_fake_inputs
    mode.allow_non_fake_inputs = True  # the real buffers the pass registered (get_attr) join as constants
    try:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*values)
    finally:
        mode.allow_non_fake_inputs = allowed
    for node in gm.graph.nodes:
        if "val" in node.meta:
            node.meta["example_value"] = node.meta["val"]


def compile_per_shape(fn: Callable, backend: Callable | str, limit: int = 1024) -> Callable:
    """``torch.compile(fn, backend=..., dynamic=False)`` allowed ``limit`` recompiles, for loops that
    feed one static shape after another (sentences of different lengths) and must never fall back
    to the uncompiled function when Dynamo's default limit (8) is reached."""
    import torch._dynamo.config as dynamo_config

    compiled = torch.compile(fn, backend=backend, dynamic=False)

    def run(*args: Any, **kwargs: Any) -> Any:
        with dynamo_config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True):
            return compiled(*args, **kwargs)

    return run


def size_hint(size: Any) -> int:
    """A concrete value for a size: the int itself, or for a SymInt the value Dynamo traced it with
    (reading it adds no guard)."""
    if isinstance(size, torch.SymInt):
        return int(size.node.hint)
    return int(size)


def constant_size(size: torch.SymInt) -> int | None:
    """The int a SymInt is known to equal (a size Dynamo kept static), else None; adds no guard."""
    return size.node.maybe_as_int()


def tree_map_tensors(fn: Callable, tree: Any) -> Any:
    """``fn`` applied to every tensor in a nested structure of tuples, lists and dicts."""
    import torch.utils._pytree as pytree

    return pytree.tree_map_only(torch.Tensor, fn, tree)


def graph_break_reasons() -> list[str]:
    """The reasons Dynamo has broken graphs for since its last reset (its own counter)."""
    from torch._dynamo.utils import counters

    return list(counters["graph_break"])


def on_recompile_limit(callback: Callable[[str], None]) -> None:
    """Call ``callback(message)`` when Dynamo hits its recompile limit on a function (from then on
    the function runs eagerly for inputs no compiled graph accepts). Dynamo says so once per
    function, through the ``torch._dynamo.convert_frame`` logger."""
    import logging

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message.startswith("torch._dynamo hit config."):
                callback(message)

    logging.getLogger("torch._dynamo.convert_frame").addHandler(Handler(level=logging.WARNING))


def fail_on_recompile_limit() -> None:
    """From now on, a function that hits Dynamo's recompile limit raises instead of running eagerly
    (a process-wide Dynamo setting)."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.fail_on_recompile_limit_hit = True
