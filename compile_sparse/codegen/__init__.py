"""Triton code generation for the sparse attention forms: templates rendered per specialisation
(``render``), a code cache, and the kernels as ``torch.library`` custom ops (``ops``); and the
native CPU kernel of the KV prefill, built on first use (``cpu``)."""

from .ops import (attention_key_scores, bitmap_compress, bitmap_decode_attention, decode_attention,
                  prefill_attention, varlen_decode_attention)

__all__ = ["attention_key_scores", "bitmap_compress", "bitmap_decode_attention", "decode_attention",
           "prefill_attention", "varlen_decode_attention"]
