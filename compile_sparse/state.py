"""State the backend owns: what passes keep across calls of compiled graphs, and what they compute
once per model (pruning plans, calibration statistics).

A KV eviction method such as H2O accumulates scores for the tokens in the cache: the prefill graph
starts them, every decode graph reads and updates them. The pass adds the state to the graph as
an extra input (placeholder) and an extra output; the backend wraps the compiled function so that
callers see the original signature, and keeps each state tensor beside the cache tensor it
describes. The state that a graph returns belongs to the cache tensor it returns (``owner_output``);
the next call finds it again by that tensor's identity (``owner_input``): a new prefill starts
fresh state, and a cache that did not come from this backend has no state, which is an error.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from ._torch_internals import size_hint
from .analysis import example_value


@dataclass
class StateSlot:
    """One state tensor threaded through a graph.

    ``input``: the placeholder the state enters by, with ``owner_input`` the placeholder of the
    cache tensor it belongs to (both None when this graph starts the state, e.g. a prefill).
    ``output``: the node computing the new state; ``owner_output`` the graph output (a cache
    tensor) the new state belongs to.
    """

    name: str
    input: fx.Node | None
    owner_input: fx.Node | None
    output: fx.Node
    owner_output: fx.Node


def add_state_input(gm: fx.GraphModule, name: str, example: torch.Tensor) -> fx.Node:
    """A new placeholder after the existing ones, with ``example`` as its example value."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    with gm.graph.inserting_after(placeholders[-1]):
        node = gm.graph.placeholder(name)
    node.meta["example_value"] = example
    return node


def add_state(gm: fx.GraphModule, slot: StateSlot) -> None:
    """Append ``slot.output`` to the graph's outputs and remember the slot on the graph."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    values = output.args[0]
    if not isinstance(values, (tuple, list)):
        raise ValueError(f"the graph returns {type(values).__name__}, not a tuple: cannot add state outputs")
    output.args = (tuple(values) + (slot.output,),)
    gm.meta.setdefault("compile_sparse_state", []).append(slot)


def state_slots(gm: fx.GraphModule) -> list[StateSlot]:
    return gm.meta.get("compile_sparse_state", [])


def extend_example_inputs(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> list[Any]:
    """``example_inputs`` plus one example per state placeholder the passes added."""
    inputs = list(example_inputs)
    for slot in state_slots(gm):
        if slot.input is not None:
            value = example_value(slot.input)
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
    (``store``), pruning plans (``plans``) and N:M calibration norms (``norms``) per model."""

    store: StateStore = field(default_factory=StateStore)
    plans: ModelCache = field(default_factory=ModelCache)
    norms: ModelCache = field(default_factory=ModelCache)


STATE = BackendState()


def with_state(fn: Callable, gm: fx.GraphModule, store: StateStore) -> Callable:
    """Wrap a compiled ``fn`` of ``gm``: feed it the stored state, store what it returns, and hand
    the caller only the graph's original outputs. ``fn`` itself when the graph has no state."""
    slots = state_slots(gm)
    if not slots:
        return fn
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    outputs = list(next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0])
    num_user_outputs = len(outputs) - len(slots)
    inputs = [(s.name, placeholders.index(s.owner_input)) for s in slots if s.input is not None]
    owners = [outputs.index(s.owner_output) for s in slots]

    def run(*args: Any) -> Any:
        extra = []
        for name, owner_index in inputs:
            state = store.get(args[owner_index])
            if state is None:
                raise RuntimeError(f"no {name} for the KV cache passed in: that cache was not produced by this "
                                   "backend's eviction. Prefill through the compiled model first (a new prefill "
                                   "starts fresh state).")
            extra.append(state)
        results = fn(*args, *extra)
        for owner_index, state in zip(owners, results[num_user_outputs:]):
            store.put(results[owner_index], state)
        return results[:num_user_outputs]

    return run
