"""HF's StaticCache, with buffers that shrink to what KV eviction keeps.

HF's ``StaticLayer`` builds every step's attention mask ``get_mask_sizes()`` wide, and that is
``max_cache_len``, a plain attribute: with a buffer smaller than that, the model's own attention
fails to trace, so the buffers could only keep the budget *inside* their full length. The first
time the KV pass rewrites a StaticCache (or on ``import compile_sparse`` once transformers is
loaded), ``install()`` changes three methods of ``StaticLayer``, for every buffer compile_sparse
did not resize a no-op:

- ``get_mask_sizes``: the width of the layer's buffers (``max_cache_len`` until compile_sparse
  resizes them);
- ``reset`` (``generate`` resets a cache it reuses): resized buffers get their full length back,
  the same tensor objects;
- ``lazy_initialization``: the buffers it allocates outside a compiled graph are ones the backend
  may resize (``compile_sparse.state.allow_resize``; buffers a compiled prefill allocates are the
  graph's outputs, marked by the backend's wrapper).

After a prompt, the backend then hands the cache buffers of the budget's size (plus room for the
tokens still to come, for a method without a decode rule), and each decode step writes its token
into a slot in place: ``generate(..., cache_implementation="static")`` holds the budget's bytes.
"""

from __future__ import annotations

import torch

from .state import allow_resize

_installed = False


def install() -> bool:
    """Let HF's StaticLayer hold buffers of any length (idempotent). False without transformers."""
    global _installed
    if _installed:
        return True
    try:
        from transformers.cache_utils import StaticLayer
        from transformers.utils import is_torchdynamo_compiling
    except ImportError:
        return False
    lazy_initialization, reset = StaticLayer.lazy_initialization, StaticLayer.reset

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return (self.keys.shape[-2] if self.is_initialized else self.max_cache_len), 0

    def initialize(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        lazy_initialization(self, key_states, value_states)
        if not is_torchdynamo_compiling():
            allow_resize(self.keys)
            allow_resize(self.values)

    def full_reset(self) -> None:
        if self.is_initialized and self.keys.shape[-2] != self.max_cache_len:
            for buffer in (self.keys, self.values):
                shape = (*buffer.shape[:2], self.max_cache_len, buffer.shape[-1])
                buffer.set_(torch.zeros(shape, dtype=buffer.dtype, device=buffer.device))
        reset(self)

    get_mask_sizes.__doc__ = "The attention mask is as wide as the buffers (compile_sparse.cache)."
    StaticLayer.get_mask_sizes, StaticLayer.lazy_initialization, StaticLayer.reset = get_mask_sizes, initialize, full_reset
    _installed = True
    return True
