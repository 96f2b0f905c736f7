"""State the backend owns: what passes keep across calls of compiled graphs, and what they compute
once per model (pruning plans, calibration statistics).

A KV eviction method keeps, per layer, the true position of every cache slot and its scores (H2O
accumulates attention across calls): the prefill graph starts that state, every later graph reads
and updates it. The pass adds the state to the graph as an extra input (placeholder) and an extra
output; the backend wraps the compiled function so that callers see the original signature, and
keeps each state tensor beside the cache tensor it describes, found again by that tensor's identity.

A cache the graph updates in place (a StaticCache buffer) is its own owner; a cache the graph hands
back as an output (DynamicCache) belongs to that output. After a prompt over cache buffers passed
in, the graph returns the kept tokens and the wrapper stores them into the buffers (``BufferSlot``).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from ._torch_internals import is_fake, mark_added_input, size_hint
from .analysis import example_value
from .passes.toolkit import output_node


@dataclass
class StateSlot:
    """One state tensor threaded through a graph.

    ``input``: the placeholder the state enters by (None when this graph starts the state: a
    prefill), ``owner_input`` the placeholder of the cache tensor it belongs to on entry.
    ``output``: the node computing the new state; ``owner_output`` the graph output (a cache
    tensor) the new state belongs to, or None when the cache is updated in place (the owner is
    then ``owner_input``'s tensor). ``default(owner)`` builds the state of a cache this backend did
    not fill, or is None: such a cache is an error.
    """

    name: str
    input: fx.Node | None
    owner_input: fx.Node | None
    output: fx.Node
    owner_output: fx.Node | None
    default: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class BufferSlot:
    """Cache buffers passed in (``buffers``: placeholders) that take the kept tokens (``kept``: graph
    outputs) after the call, through ``store(buffer tensors, kept tensors, state) -> state``, where
    ``state`` is the new state of ``slot`` (whose owner is the first buffer). ``before(args)``
    checks the call's inputs first."""

    buffers: list[fx.Node]
    kept: list[fx.Node]
    slot: StateSlot
    store: Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], torch.Tensor]
    before: Callable[[Sequence[Any]], None] | None = None


def add_state_input(gm: fx.GraphModule, name: str, example: torch.Tensor) -> fx.Node:
    """A new placeholder after the existing ones, with ``example`` as its example value."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    with gm.graph.inserting_after(placeholders[-1]):
        node = gm.graph.placeholder(name)
    node.meta["example_value"] = example
    mark_added_input(node)
    return node


def _add_output(gm: fx.GraphModule, node: fx.Node) -> None:
    output = output_node(gm.graph)
    values = output.args[0]
    if not isinstance(values, (tuple, list)):
        raise ValueError(f"the graph returns {type(values).__name__}, not a tuple: cannot add state outputs")
    output.args = (tuple(values) + (node,),)


def add_state(gm: fx.GraphModule, slot: StateSlot) -> None:
    """Append ``slot.output`` to the graph's outputs and remember the slot on the graph."""
    _add_output(gm, slot.output)
    gm.meta.setdefault("compile_sparse_state", []).append(slot)


def add_buffers(gm: fx.GraphModule, slot: BufferSlot) -> None:
    """Append ``slot.kept`` to the graph's outputs; the wrapper stores them into the buffers."""
    for node in slot.kept:
        _add_output(gm, node)
    gm.meta.setdefault("compile_sparse_buffers", []).append(slot)


def add_new_buffers(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    """Graph outputs that become a StaticCache's buffers (a prefill that allocated the cache):
    the wrapper lets the backend resize them later (``allow_resize``)."""
    gm.meta.setdefault("compile_sparse_new_buffers", []).extend(nodes)


def state_slots(gm: fx.GraphModule) -> list[StateSlot]:
    return gm.meta.get("compile_sparse_state", [])


def buffer_slots(gm: fx.GraphModule) -> list[BufferSlot]:
    return gm.meta.get("compile_sparse_buffers", [])


def extend_example_inputs(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> list[Any]:
    """``example_inputs`` plus one example per state placeholder the passes added: its example value
    when Dynamo's fake mode made it (sized by the cache tensor's own symbols, which have sources:
    a new symbol of the state's would have none, and a guard on it fails), else zeros of its size."""
    inputs = list(example_inputs)
    for slot in state_slots(gm):
        if slot.input is not None:
            value = example_value(slot.input)
            if is_fake(value):
                inputs.append(value)
                continue
            shape = [size_hint(s) for s in value.shape]  # a symbolic cache length: the traced one
            inputs.append(torch.zeros(shape, dtype=value.dtype, device=value.device))
    return inputs


class StateStore:
    """State tensors keyed by the identity of the cache tensor they describe; an entry goes away
    with its cache tensor."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, torch.Tensor]] = {}

    def put(self, owner: torch.Tensor, state: torch.Tensor) -> None:
        key = id(owner)
        self._entries[key] = (weakref.ref(owner, lambda _, key=key: self._entries.pop(key, None)), state)

    def get(self, owner: torch.Tensor) -> torch.Tensor | None:
        entry = self._entries.get(id(owner))
        if entry is None or entry[0]() is not owner:
            return None
        return entry[1]


class ModelCache:
    """Values computed from a model's weights (pruning plans, calibration norms), kept while those
    weight tensors live: keyed by the identity of the weights and a key of plain values. Dynamo
    compiles several graphs from one model (prefill, decode, recompiles); they share the entry."""

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[list[weakref.ref], Any]] = {}

    def get(self, weights: Sequence[torch.Tensor], key: Any) -> Any:
        entry = self._entries.get((tuple(map(id, weights)), key))
        if entry is None or any(ref() is not w for ref, w in zip(entry[0], weights)):
            return None
        return entry[1]

    def put(self, weights: Sequence[torch.Tensor], key: Any, value: Any) -> None:
        full = (tuple(map(id, weights)), key)
        refs = [weakref.ref(w, lambda _, full=full: self._entries.pop(full, None)) for w in weights]
        self._entries[full] = (refs, value)


@dataclass
class BackendState:
    """Everything the backend keeps between compiles and calls: KV state per cache tensor
    (``store``), pruning plans (``plans``) and N:M calibration norms (``norms``) per model, and
    what it has warned about."""

    store: StateStore = field(default_factory=StateStore)
    plans: ModelCache = field(default_factory=ModelCache)
    norms: ModelCache = field(default_factory=ModelCache)
    warned: set = field(default_factory=set)  # the causes already warned about (once each)
    graph_breaks: set = field(default_factory=set)  # Dynamo's graph-break reasons already seen
    watching_recompiles: bool = False  # the recompile-limit warning is installed
    context_call: str | None = None  # compile_sparse.compress_context's call in progress: "prefill" or "reread"
    rereads: int = 0  # re-read calls a re-read method's graph ran (compress_context checks that its call did)


STATE = BackendState()

_RESIZABLE: dict[int, weakref.ref] = {}  # cache buffers the backend may give a new size, by identity


def allow_resize(tensor: torch.Tensor) -> None:
    """Let the backend resize this cache buffer (a StaticCache's, compile_sparse.cache)."""
    key = id(tensor)
    _RESIZABLE[key] = weakref.ref(tensor, lambda _, key=key: _RESIZABLE.pop(key, None))


def is_resizable(tensor: torch.Tensor) -> bool:
    ref = _RESIZABLE.get(id(tensor))
    return ref is not None and ref() is tensor


def with_state(fn: Callable, gm: fx.GraphModule, store: StateStore) -> Callable:
    """Wrap a compiled ``fn`` of ``gm``: feed it the stored state, store the tokens it keeps into
    the cache buffers passed in, store the state it returns, and hand the caller only the graph's
    original outputs. ``fn`` itself when the graph has no state."""
    slots, buffers = state_slots(gm), buffer_slots(gm)
    if not slots and not buffers:
        return fn
    new_buffers = [output_node(gm.graph).args[0].index(n) for n in gm.meta.get("compile_sparse_new_buffers", [])]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    outputs = list(output_node(gm.graph).args[0])
    num_user_outputs = len(outputs) - len(slots) - sum(len(b.kept) for b in buffers)
    inputs = [(s, placeholders.index(s.owner_input)) for s in slots if s.input is not None]
    owners = [(outputs.index(s.owner_output), True) if s.owner_output is not None
              else (placeholders.index(s.owner_input), False) for s in slots]
    state_outputs = [outputs.index(s.output) for s in slots]
    stores = [(b, [placeholders.index(n) for n in b.buffers], [outputs.index(n) for n in b.kept], slots.index(b.slot))
              for b in buffers]

    def run(*args: Any) -> Any:
        extra = []
        for slot, owner_index in inputs:
            state = store.get(args[owner_index])
            if state is None and slot.default is not None:
                state = slot.default(args[owner_index])
            if state is None:
                raise RuntimeError(f"no {slot.name} for the KV cache passed in: that cache was not produced by this "
                                   "backend's eviction. Prefill through the compiled model first (a new prefill "
                                   "starts fresh state).")
            extra.append(state)
        for slot, *_ in stores:
            if slot.before is not None:
                slot.before(args)
        results = list(fn(*args, *extra))
        for slot, buffer_index, kept_index, state_index in stores:
            position = state_outputs[state_index]
            results[position] = slot.store([args[i] for i in buffer_index], [results[i] for i in kept_index],
                                           results[position])
        for index in new_buffers:
            allow_resize(results[index])
        for (index, is_output), position in zip(owners, state_outputs):
            store.put(results[index] if is_output else args[index], results[position])
        return tuple(results[:num_user_outputs])

    return run
