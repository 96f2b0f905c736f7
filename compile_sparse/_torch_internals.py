"""The one module that touches private torch APIs (``torch._inductor``, ``torch._dynamo``)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_with_inductor(gm: fx.GraphModule, example_inputs: Sequence[Any], mode: str | None) -> Callable:
    """Lower a (rewritten) Dynamo graph through Inductor, as ``backend="inductor"`` would."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    if mode is not None and mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    return compile_fx(gm, list(example_inputs), config_patches=list_mode_options(mode) if mode else {})


def run_on_examples(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` on example values: inside Dynamo's fake mode when they are fake tensors (so that
    tensors ``fn`` creates are fake too), directly for real or meta tensors."""
    from torch._subclasses.fake_tensor import FakeTensor

    mode = next((a.fake_mode for a in args if isinstance(a, FakeTensor)), None)
    if mode is None:
        return fn(*args, **kwargs)
    with mode:
        return fn(*args, **kwargs)
