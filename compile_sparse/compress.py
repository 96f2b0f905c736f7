"""``compress_context``: a context compressed before its questions arrive, by a KV method that scores
by the model re-reading it (KVzip; ``KVConfig.REREAD``), through a model compiled with
``backend="sparse"``.

    model.forward = torch.compile(model.forward, backend="sparse",
                                  options={"kv": {"method": "kvzip", "compression_ratio": 0.75}})
    cache, logits = compile_sparse.compress_context(model, tokenizer, context_ids)
    # the question's ids alone, with the mask of context and question: generate() takes the
    # positions from the mask (the cache is shorter than the tokens it has seen)
    mask = torch.ones(1, context_ids.shape[1] + question_ids.shape[1], dtype=torch.long)
    answer = model.generate(input_ids=question_ids, attention_mask=mask, past_key_values=cache)

Two calls of the compiled model: the context's prefill (every token kept; a row's positions count
its real tokens, as generate() counts them), then the re-read: "Repeat the previous context
exactly." in the model's chat template, the assistant's turn opened, and the context again (without
the chat template's own header), teacher-forced at the positions after the context. That call keeps
each row's budget of the context's keys and values, scored by the re-read's attention, and drops its
own (passes/kv/reread.py): the cache then holds the budget, chosen at the cost of a second forward
of the context's length over a cache twice as long. A left-padded row's question starts at its real
length (``attention_mask.sum(-1)``).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from .retrieval import chat_template_parts
from .state import STATE

REPEAT = "\n\nRepeat the previous context exactly."  # KVzip's (and kvpress's KVzipPress's) repeat prompt


@contextmanager
def _call(kind: str) -> Iterator[None]:
    STATE.context_call = kind
    try:
        yield
    finally:
        STATE.context_call = None


def reread_ids(tokenizer: Any, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """The re-read of each row: the repeat prompt, then the row's real tokens (after the chat
    template's header where the row starts with it), right-padded: ids and mask (B, R)."""
    before, after = chat_template_parts(tokenizer)
    header = tokenizer.encode(before, add_special_tokens=False)
    repeat = tokenizer.encode(REPEAT + after, add_special_tokens=False)
    rows = []
    for ids, mask in zip(input_ids, attention_mask):
        real = ids[mask.bool()].tolist()
        if header and real[:len(header)] == header:
            real = real[len(header):]
        rows.append(repeat + real)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows], device=input_ids.device)  # (B, R)
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], device=input_ids.device)
    return ids, mask.to(attention_mask.dtype)


def compress_context(model: Callable, tokenizer: Any, input_ids: Tensor,
                     attention_mask: Tensor | None = None) -> tuple[Any, Tensor]:
    """Prefill ``input_ids`` (B, T) (left-padded with ``attention_mask`` (B, T)) through ``model``, a
    model or forward compiled with ``backend="sparse"`` and a KV method that scores by a re-read,
    then re-read it so that the cache keeps the method's budget. Returns the cache (a DynamicCache)
    and the logits (B, V) of each row's last token. A layer the re-read does not compress (a
    sliding-window layer, refused with a warning) keeps the context as HF keeps it. Raises when no
    graph of a re-read method ran (another backend or method)."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    with torch.no_grad():
        positions = (mask.long().cumsum(dim=-1) - 1).masked_fill(mask == 0, 1)  # (B, T): generate()'s
        with _call("prefill"):
            out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                        logits_to_keep=1)
        cache = out.past_key_values
        ids, reread_mask = reread_ids(tokenizer, input_ids, mask)
        positions = mask.sum(dim=-1, keepdim=True) + torch.arange(ids.shape[1], device=ids.device)  # (B, R)
        rereads = STATE.rereads
        prefilled = [copy.copy(layer) for layer in cache.layers]  # each layer as the prefill left it
        with _call("reread"):
            model(input_ids=ids, attention_mask=torch.cat([mask, reread_mask], dim=-1), position_ids=positions,
                  past_key_values=cache, use_cache=True, logits_to_keep=1)
    if STATE.rereads == rereads:
        raise RuntimeError("the context's re-read ran no graph of a re-read method: compress_context needs a model "
                           "compiled with backend='sparse' and a KV method that scores by a re-read (kvzip)")
    for i, layer in enumerate(cache.layers):
        if STATE.store.get(layer.keys) is None:  # not compressed (a sliding-window layer; warned): it took the
            cache.layers[i] = prefilled[i]  # re-read's tokens, and goes back to the context as HF keeps it
    return cache, out.logits[:, -1]
