"""The retrieval protocol (KV eviction): RULER-style tasks whose answer is stated once in a long
prompt, so an eviction that forgets it fails visibly.

Cases are built from token ids with fixed seeds: a window of the SotU test speeches (the haystack)
with needles inserted at sentence ends, cut so that the prompt is exactly ``length`` tokens, in the
model's chat template. Tasks (RULER's names in brackets):

- ``single_needle`` [niah_single]: one 7-digit number for one key; the question names the key.
- ``multi_key`` [niah_multikey]: four keys with a number each; the question asks for one of them.
- ``multi_value`` [niah_multivalue]: four numbers for the same key; every one must be answered.
- ``variable_tracking`` [vt]: ``VAR A = 12345``, then ``VAR B = VAR A`` and so on, five names in a
  chain scattered through the text; every name must be answered.
- ``common_words`` [cwe]: a numbered list of words in which ten words occur far more often than
  any other; the ten must be answered.

Two settings: *query-aware* prefills the whole prompt (question included) with the method on;
*query-agnostic* compresses the context alone, then forwards the question over the compressed
cache at its true positions. The answer is decoded greedily; a case is right when every expected
string occurs in the decoded text (RULER's string match, case-insensitive).

A KV method's eviction is replayed on one dense prefill per case: the prompt's own forward is
dense under every KV method (eviction keeps a subset of the keys and values that forward made), so
the queries, keys and values of each attention are captured once and every method keeps its budget
with the same operator the compiled graph calls (``compile_sparse::kv_prefill``). The answer's
tokens are then appended without eviction (a method's decode rule would evict at most as many
tokens as the answer has). Any other setting (token dropping, a recipe with one) runs through
``torch.compile(backend="sparse")`` case by case; without a KV method its answer is decoded by
the plain model (token dropping changes the prompt's forward only).
"""

from __future__ import annotations

import bisect
import math
import random
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from .progress import progress

TASKS = ("single_needle", "multi_key", "multi_value", "variable_tracking", "common_words")
SETTINGS = ("query-aware", "query-agnostic")
LENGTH = 2048
CASES = 50
NEEDLES = 4  # keys of multi_key, values of multi_value
CHAIN = 5  # names in variable_tracking's chain
COMMON = 10  # the words common_words asks for
SLACK = 6  # tokens decoded beyond the answer's own
CAPTURE = "compile_sparse_capture"  # the attention implementation that records q, k, v
MASKED = "compile_sparse_masked_eviction"  # the attention implementation that hides evicted keys
SHARES = ("none", "heads", "layers", "layer-budgets")  # how ``allocate`` shares kept slots


@dataclass
class Case:
    """One prompt: ``context`` (1, C) and ``question`` (1, Q) token ids, C + Q the protocol's length;
    ``answers``: the strings the decoded answer must contain; ``max_new_tokens``: decoding budget."""

    task: str
    context: Tensor
    question: Tensor
    answers: list[str]
    max_new_tokens: int

    @property
    def prompt(self) -> Tensor:
        return torch.cat([self.context, self.question], dim=1)  # (1, C + Q)


def is_correct(text: str, answers: list[str]) -> bool:
    """Every expected string occurs in the decoded text (case-insensitive)."""
    return all(answer.lower() in text.lower() for answer in answers)


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------


class Haystack:
    """The SotU test speeches as token ids, where sentences end, and the words they use."""

    def __init__(self, tokenizer: Any) -> None:
        from . import models

        text = "\n".join(t for _, t in models.sotu_documents("test"))
        self.tokenizer = tokenizer
        self.ids = tokenizer(text, add_special_tokens=False).input_ids
        pieces = tokenizer.convert_ids_to_tokens(self.ids)
        self.ends = [i + 1 for i, piece in enumerate(pieces) if piece.rstrip().endswith((".", ".Ċ"))]
        self.words = sorted({w.lower() for w in re.findall(r"\b[A-Za-z]{6,10}\b", text)})

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def window(self, rng: random.Random, size: int) -> tuple[int, int]:
        """[start, start + size) of the haystack, starting after a sentence end."""
        starts = [e for e in self.ends if e + size <= len(self.ids)]
        if not starts:
            raise ValueError(f"the haystack has {len(self.ids)} tokens; a case needs {size}")
        start = rng.choice(starts)
        return start, start + size

    def sentence_end_before(self, index: int, start: int) -> int:
        """The last sentence end at or before ``index`` and after ``start`` (``index`` if none)."""
        k = bisect.bisect_right(self.ends, index) - 1
        return self.ends[k] if k >= 0 and self.ends[k] > start else index


def chat_template_parts(tokenizer: Any) -> tuple[str, str]:
    """The text before and after a user message, the assistant's turn opened (the chat template's)."""
    if getattr(tokenizer, "chat_template", None) is None:
        return "", "\n"
    marker = "\x00MESSAGE\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True)
    before, after = text.split(marker)
    return before, after


def _number(rng: random.Random) -> str:
    return str(rng.randrange(10**6, 10**7))


def _task_text(task: str, rng: random.Random, hay: Haystack) -> tuple[str, list[str], tuple[str, str], list[str]]:
    """(instruction, needles, (question, the answer's opening), answers) of one case."""
    magic = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
             "I will quiz you about the numbers afterwards.")
    if task in ("single_needle", "multi_key"):
        keys = rng.sample(hay.words, 1 if task == "single_needle" else NEEDLES)
        values = [_number(rng) for _ in keys]
        needles = [f" One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
        asked = rng.randrange(len(keys))
        question = (f"What is the special magic number for {keys[asked]} mentioned in the provided text?",
                    f"The special magic number for {keys[asked]} mentioned in the provided text is")
        return magic, needles, question, [values[asked]]
    if task == "multi_value":
        key = rng.choice(hay.words)
        values = [_number(rng) for _ in range(NEEDLES)]
        needles = [f" One of the special magic numbers for {key} is: {v}." for v in values]
        question = (f"What are all the special magic numbers for {key} mentioned in the provided text?",
                    f"The special magic numbers for {key} mentioned in the provided text are")
        return magic, needles, question, values
    if task == "variable_tracking":
        names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(CHAIN)]
        value = str(rng.randrange(10**4, 10**5))
        needles = [f" VAR {names[0]} = {value}."] + [f" VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        instruction = "Memorize and track the chain(s) of variable assignment hidden in the following text."
        question = (f"Find all variables that are assigned the value {value} in the text above.",
                    f"Answer: According to the chain(s) of variable assignment in the text above, {CHAIN} variables "
                    f"are assigned the value {value}, they are:")
        return instruction, needles, question, names
    if task == "common_words":
        instruction = "Below is a numbered list of words. In these words, some appear more often than others. " \
                      "Memorize the ones that appear most often."
        question = (f"What are the {COMMON} most common words in the above list?",
                    f"Answer: The top {COMMON} words that appear most often in the list are:")
        return instruction, [], question, rng.sample(hay.words, COMMON)
    raise ValueError(f"unknown retrieval task {task!r}; valid: {', '.join(TASKS)}")


def _word_list(rng: random.Random, hay: Haystack, common: list[str], size: int) -> list[int]:
    """common_words' context: a numbered list of at most ``size`` tokens in which each common word
    occurs more often than any other word (the others at most 3 times)."""
    frequency = max(4, size // 170)
    others = [w for w in rng.sample(hay.words, min(len(hay.words), size)) if w not in common]
    order = common * frequency + [w for w in others for _ in range(rng.randint(1, 3))]
    rng.shuffle(order)
    rare = [i for i, w in enumerate(order) if w not in common]

    def render(kept: int) -> list[int]:  # the list with the first ``kept`` rarer words
        dropped = set(rare[kept:])
        return hay.encode("".join(f"\n{i + 1}. {w}" for i, w in enumerate(w for j, w in enumerate(order)
                                                                          if j not in dropped)))

    low, high = 0, len(rare)  # the most rarer words that fit
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if len(render(middle)) <= size else (low, middle - 1)
    return render(low)


def make_case(task: str, index: int, hay: Haystack, length: int = LENGTH) -> Case:
    """Case ``index`` of ``task`` at ``length`` prompt tokens: the same for the same arguments."""
    rng = random.Random(f"{task}/{length}/{index}")
    instruction, needles, (question, opening), answers = _task_text(task, rng, hay)
    before, after = chat_template_parts(hay.tokenizer)
    head = hay.encode(before + instruction + "\n\n")
    tail = hay.encode("\n\n" + question + after + opening)
    if task == "common_words":
        body = _word_list(rng, hay, answers, length - len(head) - len(tail))
        start, _ = hay.window(rng, length)
        body = hay.ids[start:start + length - len(head) - len(tail) - len(body)] + body  # exact length: text first
    else:
        needle_ids = [hay.encode(n) for n in needles]
        size = length - len(head) - len(tail) - sum(len(n) for n in needle_ids)
        if size < 64:
            raise ValueError(f"retrieval length {length} is too short for task {task}: the prompt's fixed text takes "
                             f"{length - size} tokens")
        start, stop = hay.window(rng, size)
        depths = sorted(rng.random() for _ in needle_ids)
        cuts = [hay.sentence_end_before(start + int(d * size), start) for d in depths]
        body, last = [], start
        for cut, needle in zip(cuts, needle_ids):
            body += hay.ids[last:cut] + needle
            last = cut
        body += hay.ids[last:stop]
    context = torch.tensor([head + body])  # (1, C)
    new_tokens = len(hay.encode(" " + ", ".join(answers))) + SLACK
    if len(answers) > 1:  # the model lists them, text around each: twice a numbered list's tokens
        new_tokens = max(new_tokens, 2 * len(hay.encode("\n".join(f"{i}. {a}" for i, a in enumerate(answers, 1)))))
    return Case(task, context, torch.tensor([tail]), answers, new_tokens)  # question (1, Q)


def make_cases(tokenizer: Any, tasks: tuple[str, ...] = TASKS, length: int = LENGTH, count: int = CASES,
               first: int = 0) -> list[Case]:
    """``count`` cases of each task, in task order: cases ``first`` .. ``first + count - 1`` (the
    reported tables use 0 ..; a later range is held out for choosing a method's parameters)."""
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown retrieval task {task!r}; valid: {', '.join(TASKS)}")
    if first < 0:
        raise ValueError(f"retrieval first case {first}: must be >= 0")
    hay = Haystack(tokenizer)
    return [make_case(task, i, hay, length) for task in tasks for i in range(first, first + count)]


# ---------------------------------------------------------------------------------------------
# A dense prefill, captured
# ---------------------------------------------------------------------------------------------


@dataclass
class Site:
    """One attention of the dense prefill: q (1, H, T, D) after RoPE, k and v (1, Hkv, T, D)."""

    query: Tensor
    key: Tensor
    value: Tensor
    scale: float
    softcap: float | None


@dataclass
class Capture:
    """Every attention of a dense prefill, in layer order, and its last position's logits (1, V);
    ``rope``: the (cos, sin) tables (1, T, D) of the model's rotary embedding at the prompt's
    positions, None for a model without one."""

    sites: list[Site] = field(default_factory=list)
    logits: Tensor | None = None
    rope: tuple[Tensor, Tensor] | None = None


def _capturing_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    sites = _capturing_attention.sites
    if sites is not None:
        softcap = getattr(module.config, "attn_logit_softcapping", None)
        sites.append(Site(query, key, value, kwargs.get("scaling") or module.scaling, softcap))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


_capturing_attention.sites = None


def capture(model: torch.nn.Module, ids: Tensor) -> Capture:
    """A dense prefill of ``ids`` (1, T) that records every attention's inputs. Models whose cache
    has sliding-window layers are refused (the replay keeps a budget in every layer)."""
    from transformers import AttentionInterface, DynamicCache
    from transformers.cache_utils import DynamicSlidingWindowLayer

    if any(isinstance(layer, DynamicSlidingWindowLayer) for layer in DynamicCache(config=model.config).layers):
        raise ValueError("the retrieval replay handles full-attention layers only: this model's cache has "
                         "sliding-window layers")

    AttentionInterface.register(CAPTURE, _capturing_attention)
    previous = model.config._attn_implementation
    result = Capture()
    model.set_attn_implementation(CAPTURE)
    _capturing_attention.sites = result.sites
    try:
        result.logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1]
    finally:
        _capturing_attention.sites = None
        model.set_attn_implementation(previous)
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is not None and result.sites:
        result.rope = rotary(result.sites[0].query, torch.arange(ids.shape[1], device=ids.device)[None])
    return result


# ---------------------------------------------------------------------------------------------
# Allocations studied masked (before a cache holds them)
# ---------------------------------------------------------------------------------------------


def top_mask(scores: Tensor, count: int) -> Tensor:
    """The ``count`` highest of ``scores`` along its last axis, as a mask of the same shape."""
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(count, dim=-1).indices, True)


def allocate(scores: list[Tensor], budget: int, share: str = "none", floor: float = 0.0) -> list[Tensor]:
    """Which prompt keys each layer keeps, ``Hkv * budget`` of them per layer on average.

    scores: per layer (B, Hkv, T). ``share``: ``"none"`` each KV head keeps its top ``budget``;
    ``"heads"`` each head its top ``floor * budget``, the rest of a layer's slots to the highest
    scores of any of its heads (AdaKV); ``"layers"`` the same across every layer and head (KVzip's
    allocation, kvpress's ``layerwise=False``); ``"layer-budgets"`` each layer the number of slots
    ``"layers"`` gives it, split evenly among its heads (``layer_budgets``), each head its top ones:
    a cache of one length per layer holds it. Returns per layer (B, Hkv, T) bool."""
    if share not in SHARES:
        raise ValueError(f"share must be one of {SHARES}, got {share!r}")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor must be in [0, 1], got {floor}")
    if share == "layer-budgets":
        counts = layer_budgets(scores, budget, floor)  # (B, L)
        return [torch.stack([top_mask(s[row], int(counts[row, i])) for row in range(s.shape[0])])
                for i, s in enumerate(scores)]
    base = budget if share == "none" else int(budget * floor)
    keep = [top_mask(s, base) for s in scores]
    groups = [[i] for i in range(len(scores))] if share == "heads" else [list(range(len(scores)))]
    for layers in groups if budget > base else []:
        rest = torch.cat([scores[i].masked_fill(keep[i], float("-inf")).flatten(1) for i in layers], dim=1)  # (B, ΣHkv*T)
        heads = sum(scores[i].shape[1] for i in layers)
        chosen = top_mask(rest, heads * (budget - base)).split([scores[i][0].numel() for i in layers], dim=1)
        for i, extra in zip(layers, chosen):
            keep[i] = keep[i] | extra.view_as(keep[i])
    return keep


def layer_budgets(scores: list[Tensor], budget: int, floor: float = 0.0) -> Tensor:
    """Keys per head of each layer (B, L): the slots the ``"layers"`` allocation gives a layer over
    its Hkv heads, rounded by largest remainders so that the layers keep ``L * budget`` per head in
    all. scores: per layer (B, Hkv, T), the same Hkv in every layer."""
    heads = {s.shape[1] for s in scores}
    if len(heads) != 1:
        raise ValueError(f"layer budgets need the same number of KV heads in every layer, got {sorted(heads)}")
    won = torch.stack([k.sum(dim=(1, 2)) for k in allocate(scores, budget, "layers", floor)], dim=1) / heads.pop()  # (B, L)
    counts = won.floor().long()
    short = len(scores) * budget - counts.sum(dim=1, keepdim=True)  # (B, 1)
    rank = (won - counts).argsort(dim=1, descending=True).argsort(dim=1)  # (B, L): 0 for the largest remainder
    return counts + (rank < short).long()


def masked_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA over a dense cache with each KV head's evicted prompt keys hidden, causal after them:
    ``masked_attention.kept[layer]`` (B, Hkv, T) the prompt keys a head keeps. query (B, H, n, D),
    key and value (B, Hkv, L, D) with L >= T (kvpress's way of evaluating per-head budgets)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kept = masked_attention.kept[module.layer_idx]
    b, hkv, t = kept.shape
    n, total = query.shape[2], key.shape[2]
    steps = torch.arange(total, device=query.device)
    causal = steps[None, :] <= steps[total - n:, None]  # (n, L)
    visible = causal.expand(b, hkv, n, total).clone()  # (B, Hkv, n, L)
    visible[..., :t] &= kept[:, :, None, :]
    mask = visible.repeat_interleave(query.shape[1] // hkv, dim=1)  # (B, H, n, L)
    return sdpa_attention_forward(module, query, key, value, mask, **kwargs)


masked_attention.kept = {}


@contextmanager
def masked(model: torch.nn.Module, kept: list[Tensor]) -> Iterator[None]:
    """Inside, ``model`` attends with each head's evicted prompt keys hidden: ``kept`` per layer
    (B, Hkv, T), as ``allocate`` returns (``masked_attention``)."""
    from transformers import AttentionInterface

    AttentionInterface.register(MASKED, masked_attention)
    previous = model.config._attn_implementation
    masked_attention.kept = dict(enumerate(kept))
    model.set_attn_implementation(MASKED)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
        masked_attention.kept = {}


# ---------------------------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------------------------


def greedy(model: Callable, logits: Tensor, cache: Any, position: int, max_new_tokens: int, stop: set[int],
           done: Callable[[list[int]], bool] = lambda tokens: False) -> list[int]:
    """Greedy tokens after ``logits`` (1, V), each fed over ``cache`` at its true position
    (``position`` the first's), until a stop token, ``done(tokens)`` or ``max_new_tokens``."""
    out: list[int] = []
    for step in range(max_new_tokens):
        token = int(logits.argmax(dim=-1))
        if token in stop:
            break
        out.append(token)
        if step + 1 == max_new_tokens or done(out):
            break
        ids = torch.tensor([[token]])  # (1, 1)
        logits = model(input_ids=ids, past_key_values=cache, position_ids=torch.tensor([[position + step]]),
                       use_cache=True).logits[:, -1]
    return out


def feed(model: Callable, ids: Tensor, cache: Any, position: int, one_at_a_time: bool) -> Tensor:
    """Forward ``ids`` (1, n) over ``cache`` at positions ``position``...; the last logits (1, V)."""
    positions = torch.arange(position, position + ids.shape[1])[None]  # (1, n)
    if one_at_a_time:
        for i in range(ids.shape[1]):
            logits = model(input_ids=ids[:, i:i + 1], past_key_values=cache, position_ids=positions[:, i:i + 1],
                           use_cache=True).logits[:, -1]
        return logits
    return model(input_ids=ids, past_key_values=cache, position_ids=positions, use_cache=True).logits[:, -1]


def replayed_cache(model: torch.nn.Module, captured: Capture, config: Any, length: int,
                   memo: dict | None = None) -> tuple[Any, list[Tensor]]:
    """The cache a KV method leaves after prefilling the first ``length`` captured tokens: each
    layer keeps its budget with ``compile_sparse::kv_prefill`` (its attention totals from
    ``kv_attention_totals`` for a method that observes every query), as the compiled graph does.
    ``memo`` keeps the totals for the same method at another ratio (they do not depend on it).
    Returns a DynamicCache and the kept tokens' positions per layer (1, Hkv, K)."""
    import dataclasses
    from transformers import DynamicCache

    from .passes.kv.scoring import POSITION, spec_of

    if config.packed:
        raise ValueError("replayed_cache builds a cache HF's own attention reads: head_budgets='adaptive' (a packed "
                         "cache) is read by the compiled graph only; use allocate() and masked() for per-head studies")
    spec = spec_of(config)
    memo = {} if memo is None else memo
    cache = DynamicCache(config=model.config)
    kept = []
    for layer, site in enumerate(captured.sites):
        q, k, v = (t[:, :, :length] for t in (site.query, site.key, site.value))
        totals = None
        if config.OBSERVES == "all":
            key = (spec_of(dataclasses.replace(config, compression_ratio=0.0)), layer, length)
            if key not in memo:
                memo[key] = torch.ops.compile_sparse.kv_attention_totals(q, k, v, None, site.scale, site.softcap, spec)[1]
            totals = memo[key]
        rope = [None, None]
        if config.READS_ROPE and captured.rope is not None:
            rope = [table[:, None, :length] for table in captured.rope]  # (1, 1, length, D)
        keys, values, state = torch.ops.compile_sparse.kv_prefill(q, k, v, None, totals, spec, layer, len(captured.sites),
                                                                  site.scale, site.softcap, "auto", *rope)
        cache.update(keys, values, layer)
        kept.append(state[..., POSITION])
    return cache, kept


def dense_cache(model: torch.nn.Module, captured: Capture, length: int) -> Any:
    """The dense cache of the first ``length`` captured tokens."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for layer, site in enumerate(captured.sites):
        cache.update(site.key[:, :, :length], site.value[:, :, :length], layer)
    return cache


def kept_cache(model: torch.nn.Module, captured: Capture, length: int, kept: list[Tensor]) -> Any:
    """A cache of the kept prompt keys: ``kept[layer]`` (1, Hkv, T) bool over the first ``length``
    captured tokens, the same count in every head of a layer (``allocate``'s uniform shares)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for layer, site in enumerate(captured.sites):
        b, hkv, _ = kept[layer].shape
        index = kept[layer].nonzero()[:, -1].view(b, hkv, -1, 1).expand(-1, -1, -1, site.key.shape[-1])  # (1, Hkv, K, D)
        cache.update(site.key[:, :, :length].gather(2, index), site.value[:, :, :length].gather(2, index), layer)
    return cache


def _answer(model: Callable, case: Case, setting: str, cache: Any, logits: Tensor | None, stop: set[int],
            done: Callable[[list[int]], bool]) -> list[int]:
    """Decode the answer over a cache of the prompt (query-aware: ``logits`` its last position's)
    or of the context (query-agnostic: the question is fed first)."""
    if setting == "query-agnostic":
        sizes = {layer.keys.shape[-2] for layer in cache.layers}
        logits = feed(model, case.question, cache, case.context.shape[1], one_at_a_time=len(sizes) > 1)
    return greedy(model, logits, cache, case.prompt.shape[1], case.max_new_tokens, stop, done)


def stop_tokens(tokenizer: Any) -> set[int]:
    """End of turn and end of text."""
    ids = {tokenizer.eos_token_id}
    for special in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        token = tokenizer.convert_tokens_to_ids(special)
        if isinstance(token, int) and token != tokenizer.unk_token_id:
            ids.add(token)
    return {i for i in ids if i is not None}


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """Per-case correctness of one setting, by task, and the decoded answers."""

    name: str
    correct: dict[str, list[bool]] = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)
    kept: list[float] = field(default_factory=list)  # per case: the share of the prefilled tokens cached

    def add(self, case: Case, text: str, kept: float = 1.0) -> None:
        self.correct.setdefault(case.task, []).append(is_correct(text, case.answers))
        self.texts.append(text)
        self.kept.append(kept)

    @property
    def kv_removed(self) -> float:
        """The share of the prefilled tokens' keys and values not cached, mean over cases and layers."""
        return 1 - sum(self.kept) / len(self.kept)

    @property
    def tasks(self) -> dict[str, float]:
        return {task: sum(c) / len(c) for task, c in self.correct.items()}

    @property
    def accuracy(self) -> float:
        """The mean over tasks."""
        return sum(self.tasks.values()) / len(self.tasks)


def kv_config(options: dict) -> Any:
    """The KV method's config of a setting that is a KV method alone with a cache HF's attention
    reads, scoring the prompt's own attention (it is replayed), else None (it runs compiled: a
    packed cache, per-head budgets, is read by the compiled graph only; a method that scores by a
    re-read compresses through compress_context)."""
    from .options import parse_options

    methods = parse_options(options).methods
    if set(methods) != {"kv"} or methods["kv"].packed or methods["kv"].REREAD:
        return None
    return methods["kv"]


def rereads(options: dict) -> bool:
    """The setting's KV method scores by a re-read (KVzip): its prompt goes through compress_context."""
    from .options import parse_options

    kv = parse_options(options).methods.get("kv")
    return kv is not None and kv.REREAD


def compiled_setting(model: torch.nn.Module, options: dict) -> Callable:
    """``model.forward`` compiled with the backend for a setting that is not replayed. Without a KV
    method it is compiled for static sizes: the token pass needs the prompt length static, and
    Dynamo would otherwise make it symbolic once the same forward has seen two lengths (one graph
    per length then: query-aware prompts all have the protocol's)."""
    torch.compiler.reset()
    return torch.compile(model.forward, backend="sparse", options={"lowering": "eager", **options},
                         dynamic=False if prefill_only(options) else None)


def prefill_only(options: dict) -> bool:
    """A setting without a KV method changes the prompt's forward only (token dropping: decode
    steps run dense over the shorter cache), so its answer is decoded by the plain model, and its
    compiled forward sees prompt lengths alone (the token pass needs them static)."""
    from .options import parse_options

    return "kv" not in parse_options(options).methods


def truncate_ratio(options: dict) -> float | None:
    """The fraction a setting's KV method removes (its truncation baseline), None without one."""
    from .options import parse_options

    kv = parse_options(options).methods.get("kv")
    return kv.compression_ratio if kv is not None and kv.compression_ratio > 0 else None


def _share(cache: Any, length: int) -> float:
    """The share of ``length`` prefilled tokens a cache holds, mean over layers."""
    return sum(layer.keys.shape[-2] for layer in cache.layers) / (len(cache.layers) * length)


class Answerer:
    """Greedy answers of one case, stopped when every expected string is out."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.stop = tokenizer, stop_tokens(tokenizer)

    def text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def __call__(self, model: Callable, case: Case, setting: str, cache: Any, logits: Tensor | None) -> str:
        done = lambda tokens: is_correct(self.text(tokens), case.answers)  # noqa: E731
        return self.text(_answer(model, case, setting, cache, logits, self.stop, done))


def observed_length(case: Case, setting: str) -> int:
    """The tokens prefilled with the method on: the prompt (query-aware) or the context."""
    return case.prompt.shape[1] if setting == "query-aware" else case.context.shape[1]


def run(model: torch.nn.Module, tokenizer: Any, cases: list[Case], settings: list[dict], setting: str = "query-aware",
        compiled: Callable[[dict], Callable] | None = None,
        labels: list[str] | None = None) -> tuple[Outcome, dict[float, Outcome], list[Outcome]]:
    """Dense and every setting on ``cases``, then truncation at each setting's KV ratio, or at the
    share a setting without one measured removed (token dropping), to 3 decimals.
    ``compiled(options)`` gives the compiled forward of a setting that is not a KV method alone
    (``compiled_setting`` by default)."""
    from .compress import compress_context

    if setting not in SETTINGS:
        raise ValueError(f"unknown retrieval setting {setting!r}; valid: {', '.join(SETTINGS)}")
    answer = Answerer(tokenizer)
    configs = [kv_config(options) for options in settings]
    compiled = compiled or (lambda options: compiled_setting(model, options))
    dense = Outcome("dense")
    outcomes = [Outcome(label) for label in labels or [str(s) for s in settings]]
    with torch.no_grad():
        for case in progress(cases, desc=f"retrieval ({setting})", unit="case"):
            length, observed = case.prompt.shape[1], observed_length(case, setting)
            captured = capture(model, case.prompt)
            dense.add(case, answer(model, case, "query-aware", dense_cache(model, captured, length), captured.logits))
            memo: dict = {}
            for config, outcome in zip(configs, outcomes):
                if config is not None:
                    cache, _ = replayed_cache(model, captured, config, observed, memo)
                    kept = _share(cache, observed)  # before the answer grows the cache
                    outcome.add(case, answer(model, case, setting, cache, captured.logits if setting == "query-aware"
                                             else None), kept)
        # the compiled settings one after another: each compiles afresh, with Dynamo's recompile limit to itself
        for options, config, outcome in zip(settings, configs, outcomes):
            if config is not None:
                continue
            forward = compiled(options)
            step = model if prefill_only(options) else forward
            for case in progress(cases, desc=f"retrieval ({setting}): {outcome.name}", unit="case"):
                observed = observed_length(case, setting)
                if rereads(options):
                    cache, logits = compress_context(forward, tokenizer, case.prompt[:, :observed])
                else:
                    out = forward(input_ids=case.prompt[:, :observed], use_cache=True, logits_to_keep=1)
                    cache, logits = out.past_key_values, out.logits[:, -1]
                kept = _share(cache, observed)  # before the answer grows the cache
                outcome.add(case, answer(step, case, setting, cache, logits), kept)
        ratios = {truncate_ratio(options) or round(outcome.kv_removed, 3) for options, outcome in zip(settings, outcomes)}
        truncate = {ratio: truncation(model, answer, cases, setting, ratio) for ratio in sorted(ratios) if ratio > 0}
    return dense, truncate, outcomes


def truncation(model: torch.nn.Module, answer: Answerer, cases: list[Case], setting: str, ratio: float) -> Outcome:
    """The naive baseline: prefill only the last floor(n * (1 - ratio)) of the n tokens the setting
    compresses, at their true positions (query-agnostic: then the question)."""
    outcome = Outcome(f"truncate {ratio}")
    for case in progress(cases, desc=f"truncate {ratio}", unit="case"):
        observed = observed_length(case, setting)
        budget = max(1, math.floor(observed * (1 - ratio)))
        out = model(input_ids=case.prompt[:, observed - budget:observed], use_cache=True, logits_to_keep=1,
                    position_ids=torch.arange(observed - budget, observed)[None])  # (1, budget): the last tokens
        outcome.add(case, answer(model, case, setting, out.past_key_values, out.logits[:, -1]), budget / observed)
    return outcome
