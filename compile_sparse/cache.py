"""``SparseStaticCache``: a StaticCache whose buffers shrink to what KV eviction keeps.

HF's StaticCache cannot hold a buffer smaller than ``max_cache_len``: ``generate`` builds each
step's attention mask ``StaticLayer.get_mask_sizes()`` wide, and that is ``max_cache_len``, a plain
attribute, so a smaller buffer makes the model's own attention fail to trace. With HF's StaticCache
the backend therefore keeps the budget *inside* the full buffers (eviction holds, memory does not
shrink). This subclass reports the mask as wide as its buffers, so after a prompt the backend
resizes them to the budget (and the decode window, for methods without a decode rule):

    cache = compile_sparse.SparseStaticCache(model.config, max_cache_len=ids.shape[1] + 64, batch_size=1)
    model.generate(ids, past_key_values=cache, max_new_tokens=64)

``reset()`` (``generate`` resets a cache it reuses) gives the buffers back their full length.
"""

from __future__ import annotations

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from .state import allow_resize

class SparseStaticLayer(StaticLayer):
    """A StaticLayer whose attention mask is as wide as its buffers, whatever their size."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        allow_resize(self.keys)
        allow_resize(self.values)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return (self.keys.shape[-2] if self.is_initialized else self.max_cache_len), 0

    def reset(self) -> None:
        """Empty the cache and give the buffers their full length again (same tensor objects)."""
        if self.is_initialized:
            for buffer in (self.keys, self.values):
                shape = (*buffer.shape[:2], self.max_cache_len, buffer.shape[-1])
                buffer.set_(torch.zeros(shape, dtype=buffer.dtype, device=buffer.device))
        super().reset()


class SparseStaticCache(StaticCache):
    """A StaticCache (every full-attention layer a SparseStaticLayer), allocated up front for
    ``batch_size`` sequences of ``max_cache_len`` tokens in ``dtype`` on ``device``."""

    def __init__(self, config, max_cache_len: int, batch_size: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", **kwargs) -> None:
        super().__init__(config=config, max_cache_len=max_cache_len, **kwargs)
        self.layers = [SparseStaticLayer(max_cache_len=max_cache_len) if type(layer) is StaticLayer else layer
                       for layer in self.layers]
        text = config.get_text_config(decoder=True)
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.early_initialization(batch_size, heads, head_dim, dtype, torch.device(device))
