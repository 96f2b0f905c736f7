"""The KV-cache eviction pass (compile side): every attention site over a cache is rewritten so
that the cache the model hands back holds only what the method keeps.

- **Prefill** (the cache starts empty in the graph; DynamicCache, or a StaticCache allocated in
  the graph): ``kv_prefill`` keeps each row's budget of its real (unpadded) tokens, and the graph
  hands back those slots in place of the full cache (a StaticCache's buffers become them:
  compile_sparse.cache lets HF's StaticLayer hold buffers of any length). For methods that score
  with every query's attention, ``kv_attention_totals`` computes the attention output and the
  scores in one pass.
  Budgets are expressions of the prompt length: one graph serves every length.
- **A prompt over a StaticCache passed in** (``generate`` reuses its StaticCache; a user's own):
  the same, attending to the prompt's own tokens, and the backend resizes the cache's buffers to
  the kept slots after the call.
- A StaticCache whose buffers cannot shrink (a full-attention layer of the graph left as it is: one
  mask serves every layer) keeps the budget at the start of its full-length buffers.
- **One new token** over a compressed cache, for methods with a decode rule: ``slot_decode``
  writes it in place into the slot the rule frees (one compiled graph, no copy of the cache). Every
  layer calls one subgraph of it (``call_compiled_once``), so Inductor lowers the step once.
  A StaticCache for a method without a decode rule fills the free slots kept after its prompt.
- **Several new tokens** over a DynamicCache (or decode with eviction off): they are appended,
  with a mask over the real slots; a method with a decode rule keeps the cache at its size.
- **A method that scores by a re-read** (KVzip, ``REREAD``): its prefill keeps every token, and the
  graph lowered for ``compile_sparse.compress_context``'s re-read call (``PassContext.reread``)
  keeps the budget of the cached tokens and drops the re-read's own (passes/kv/reread.py).

With per-head budgets (``head_budgets="adaptive"``) the kept slots are packed, and the decode step
and the several-token calls read them through each slot's owner head (passes/kv/packed.py).

State per cache slot (position, priority, the method's own state, the owner when packed) travels
beside the cache tensor in the backend's state store (compile_sparse.state).
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import torch
import torch.fx as fx

from ...analysis import AttentionSite, GraphAnalysis, example_value
from ...analysis.ops import op_name
from ...reference import mask_allows
from ...report import PassResult
from ... import cache
from ..._torch_internals import call_compiled_once
from ...state import BufferSlot, StateSlot, add_buffers, add_new_buffers, add_state, add_state_input
from ..context import PassContext
from ..registry import method_of, register_pass
from ..toolkit import inserting_after_all, output_node, remove_dead_code
from .decode import continuation_mask, continuation_state, pad_free, slot_decode
from .packed import packed_continuation, packed_decode, row_owners
from .prefill import keep_in_buffers, widest, write_prefix  # (registers the ops)
from .reread import prompt_state, query_validity
from .scoring import POSITION, KVConfig, spec_of


def key_validity(mask: torch.Tensor, how: str, query: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """The real tokens (B, T) of a prompt, read off the attention mask a prefill applies: the keys
    its last query may see (padding is hidden from every query). query (B, H, T, D); new (B, Hkv, T, D)."""
    allowed = mask_allows(mask, how)  # (B or 1, H or 1, T, S)
    return allowed[:, 0, -1, :new.shape[2]].expand(query.shape[0], new.shape[2])


def _counter(update: fx.Node) -> fx.Node | None:
    """The placeholder of the StaticCache's token counter a write ``index_copy_(2, position, new)``
    reads its position from (``arange(n) + cumulative_length``)."""
    seen, stack = set(), [update.args[2]]
    while stack:
        node = stack.pop()
        if not isinstance(node, fx.Node) or node in seen:
            continue
        seen.add(node)
        if node.op == "placeholder":
            return node
        stack.extend(node.all_input_nodes)
    return None


def _fresh_check(gm: fx.GraphModule, counter: fx.Node):
    """A check, before the call, that a prompt over a StaticCache passed in starts it (its counter
    is 0): compile_sparse compresses whole prompts, not a prompt continued in chunks."""
    index = [n for n in gm.graph.nodes if n.op == "placeholder"].index(counter)

    def check(args) -> None:
        if int(args[index].reshape(-1)[0]) != 0:
            raise ValueError("a multi-token forward over a StaticCache that already holds tokens: compile_sparse "
                             "compresses whole prompts (a prompt prefilled in chunks is not supported); reset the "
                             "cache first, or use a DynamicCache")
    return check


def _default_state(config: KVConfig):
    """The state of a DynamicCache this backend did not compress, for calls that only grow it:
    every slot real, in order (packed: row r's slots owned by head r)."""
    def build(keys: torch.Tensor) -> torch.Tensor:
        b, hkv, length, _ = keys.shape
        state = keys.new_zeros((b, hkv, length, config.state_channels), dtype=torch.float32)
        state[..., POSITION] = torch.arange(length, device=keys.device, dtype=torch.float32)
        return row_owners(state) if config.packed else state
    return build


def _refusal(site: AttentionSite, config: KVConfig) -> str | None:
    """Why a site over a cache is left as it is, or None."""
    k, v = site.k_cache, site.v_cache
    if k.kind == "sliding":
        return "a sliding-window layer (HF keeps its last tokens): left to HF's window rule"
    if config.REREAD and k.kind == "index_copy":
        return ("a StaticCache: the method re-reads its context into the cache (compile_sparse.compress_context), "
                "which needs a DynamicCache")
    if site.causal is not True:
        return "attention over a cache that is not causal: left as it is"
    if k.kind != v.kind or k.prefill != v.prefill:
        return f"K and V are cached differently ({k.kind} / {v.kind})"
    if k.kind == "concat" and (k.output is None or v.output is None):
        return "the cache update is not handed back as a graph output"
    if k.kind == "index_copy" and k.prefill and (k.output is None or v.output is None):
        return "a StaticCache made in the graph that the graph does not hand back"
    return None


class _Site:
    """One site's rewrite: the nodes it reads and adds."""

    def __init__(self, gm: fx.GraphModule, site: AttentionSite, config: KVConfig, ctx: PassContext, num_layers: int,
                 resize: bool):
        self.gm, self.graph, self.site, self.config, self.ctx = gm, gm.graph, site, config, ctx
        self.resize = resize  # StaticCache buffers take the kept slots' size
        self.spec = spec_of(config)
        self.num_layers = num_layers
        self.k, self.v = site.k_cache, site.v_cache
        self.name = f"kv_state_{site.node.name}"
        self.evict = config.SUPPORTS_DECODE and config.decode

    def call(self, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        return self.graph.call_function(target, args, kwargs)

    def items(self, node: fx.Node, count: int) -> list[fx.Node]:
        return [self.call(operator.getitem, node, i) for i in range(count)]

    def replace_output(self, new: fx.Node) -> None:
        """The site's attention output is now ``new`` (which does not read it), of the same shape:
        it takes the old one's example value (the graph's method calls on it need one)."""
        if "example_value" in self.site.output.meta:
            new.meta["example_value"] = self.site.output.meta["example_value"]
        self.site.output.replace_all_uses_with(new)

    def hand_back(self, old: fx.Node, new: fx.Node) -> None:
        """The graph returns ``new`` where it returned the cache tensor ``old``."""
        output_node(self.graph).replace_input_with(old, new)

    def valid(self) -> fx.Node | None:
        site = self.site
        if site.mask is None:
            return None
        return self.call(key_validity, site.mask, site.mask_how, site.query, self.k.new)

    def prompt(self) -> list[fx.Node]:
        """Insert the prompt's eviction; returns the kept keys, values and state. With per-layer
        budgets every layer's tensors get the widest layer's length (its extra slots empty): HF
        builds one attention mask for every layer."""
        site, config = self.site, self.config
        with inserting_after_all(self.graph, [site.output, self.k.new, self.v.new]):
            valid = self.valid()
            totals = None
            if config.OBSERVES == "all" and site.form == "sdpa" and not self.kernels_path():
                # the attention output and the scores from the same chunks of rows
                both = self.call(torch.ops.compile_sparse.kv_attention_totals.default, site.query, self.k.new,
                                 self.v.new, valid, site.scale, site.softcap, self.spec)
                out, totals = self.items(both, 2)
                self.replace_output(out)
            rope = site.rope if config.READS_ROPE and site.rope is not None else (None, None)
            prefill = self.call(torch.ops.compile_sparse.kv_prefill.default, site.query, self.k.new, self.v.new, valid,
                                totals, self.spec, site.layer, self.num_layers, site.scale, site.softcap,
                                self.ctx.kernels, *rope)
            kept = self.items(prefill, 3)
            if self.per_layer_budgets():
                kept = self.items(self.call(widest, *kept, self.k.new, spec=self.spec, num_layers=self.num_layers), 3)
            return kept

    def kernels_path(self) -> bool:
        """The per-key scores come from the Triton key-score kernel (CUDA, or interpreted on request)."""
        query = example_value(self.site.query)
        return self.ctx.kernels == "interpret" or (query is not None and query.is_cuda)

    def per_layer_budgets(self) -> bool:
        """The method's budgets differ between layers (at the traced length)."""
        length = example_value(self.site.query).shape[2]
        return len({str(self.config.budget(layer, self.num_layers, length)) for layer in range(self.num_layers)}) > 1

    def free_slots(self, kept: list[fx.Node], holder: fx.Node, dim: int) -> list[fx.Node]:
        """A StaticCache keeps room after the prompt for a method without a decode rule."""
        if self.evict:
            return kept
        return self.items(self.call(pad_free, *kept, holder, dim, self.k.new, packed=self.config.packed), 3)

    # -- the cases -------------------------------------------------------------------------------

    def prefill(self) -> tuple[str, str]:
        """The cache starts empty here: the graph hands back the kept slots (a StaticCache made here
        takes them as its buffers, or, without ``resize``, keeps its length, the kept slots written
        at its start)."""
        kept = self.prompt()
        static = self.k.kind == "index_copy"
        if static:
            with inserting_after_all(self.graph, kept):
                kept = self.free_slots(kept, self.k.input, 2)
                if not self.resize:
                    state = self.call(write_prefix, self.k.output, self.v.output, *kept)
            if not self.resize:
                add_state(self.gm, StateSlot(self.name, None, None, state, self.k.output))
                return "prefill eviction", "prefill eviction (the StaticCache keeps its full buffers; the budget is kept in them)"
        keys, values, state = kept
        self.hand_back(self.k.output, keys)
        self.hand_back(self.v.output, values)
        add_state(self.gm, StateSlot(self.name, None, None, state, keys))
        if static:
            add_new_buffers(self.gm, [keys, values])
            return "prefill eviction", "prefill eviction (the StaticCache's buffers hold the kept slots)"
        return "prefill eviction", "prefill eviction"

    def static_prompt(self) -> tuple[str, str]:
        """A prompt written into StaticCache buffers passed in: after the call the buffers take the
        kept slots (resized to them, or, without ``resize``, written at their start)."""
        kept = self.prompt()
        with inserting_after_all(self.graph, kept):
            keys, values, state = self.free_slots(kept, self.k.input, 2)
        slot = StateSlot(self.name, None, self.k.input, state, None)
        add_state(self.gm, slot)
        counter = _counter(self.k.update)
        add_buffers(self.gm, BufferSlot([self.k.input, self.v.input], [keys, values], slot,
                                        functools.partial(keep_in_buffers, resize=self.resize),
                                        _fresh_check(self.gm, counter) if counter is not None else None))
        return "prefill eviction", "prefill eviction (into the StaticCache passed in)"

    def keep_whole(self) -> tuple[str, str]:
        """A prompt of a method that scores by a re-read: every token stays, with its state."""
        with inserting_after_all(self.graph, [self.k.new, self.site.query, self.site.mask]):
            state = self.call(prompt_state, self.k.new, self.valid(), channels=self.config.state_channels,
                              packed=self.config.packed)
        add_state(self.gm, StateSlot(self.name, None, None, state, self.k.output))
        return "prefill kept whole", "prefill: every token kept, for compile_sparse.compress_context's re-read"

    def reread(self) -> tuple[str, str]:
        """A context's re-read: the cache keeps each row's budget of its slots, scored by the
        re-read's attention (HF's own mask: the slots are the whole prompt's, in order), and
        hands back none of the re-read's tokens."""
        site = self.site
        state_in = self.state_input()
        with inserting_after_all(self.graph, [site.output, self.k.update, self.v.update, state_in]):
            real = None if site.mask is None else self.call(query_validity, site.mask, site.mask_how)
            reread = self.call(torch.ops.compile_sparse.kv_reread.default, site.query, self.k.update, self.v.update,
                               state_in, real, self.spec, site.scale, site.softcap)
            keys, values, state = self.items(reread, 3)
        self.hand_back(self.k.output, keys)
        self.hand_back(self.v.output, values)
        add_state(self.gm, StateSlot(self.name, state_in, self.k.input, state, keys))
        return "context re-read", "context re-read: the cache keeps the budget of its tokens, the re-read's are dropped"

    def state_input(self) -> fx.Node:
        past = example_value(self.k.input)  # (B, Hkv, P, D)
        example = past.new_zeros((*past.shape[:3], self.config.state_channels), dtype=torch.float32)
        return add_state_input(self.gm, self.name, example)

    def one_token(self) -> tuple[str, str]:
        """One new token written in place into a slot (packed: a slot its head owns)."""
        site, dynamic = self.site, self.k.kind == "concat"
        state_in = self.state_input()
        past_k, past_v = self.k.input, self.v.input
        args = [site.query, self.k.new, self.v.new, past_k, past_v, state_in]
        kwargs = dict(spec=self.spec, scale=site.scale, softcap=site.softcap, evict=self.evict)
        with inserting_after_all(self.graph, [site.output, self.k.new, self.v.new]):
            step_fn, name = (packed_decode, "kv_packed_decode") if self.config.packed else (slot_decode, "kv_slot_decode")
            step = call_compiled_once(self.gm, step_fn, args, kwargs, name)
            out, state = self.items(step, 2)
        self.replace_output(out)
        if dynamic:  # the cache tensors, written in place, are what the graph hands back
            self.hand_back(self.k.output, past_k)
            self.hand_back(self.v.output, past_v)
        else:
            for slot in (self.k, self.v):
                self.graph.erase_node(slot.update)
        add_state(self.gm, StateSlot(self.name, state_in, past_k, state, past_k if dynamic else None))
        if self.evict:
            return "decode eviction", "decode eviction: the new token takes the slot its rule frees, in place"
        return "decode", "decode: the new token takes a free slot (no decode rule)"

    def continuation(self) -> tuple[str, str]:
        """Several new tokens appended after a DynamicCache's slots (or decode with eviction off)."""
        site = self.site
        state_in = self.state_input()
        n = example_value(site.query).shape[2]
        kwargs = dict(spec=self.spec, scale=site.scale, softcap=site.softcap, evict=self.evict)
        if self.config.packed:  # the attention itself reads the packed rows
            with inserting_after_all(self.graph, [site.output, self.k.update, self.v.update, state_in]):
                grown = self.call(packed_continuation, site.query, self.k.update, self.v.update, state_in, **kwargs)
                out, keys, values, state = self.items(grown, 4)
            self.replace_output(out)
        else:
            with inserting_after_all(self.graph, [site.query, state_in]):
                mask = self.call(continuation_mask, state_in, site.query)  # n read from the query: no raw SymInt in the graph
            _apply_mask(self.graph, site, mask)
            with inserting_after_all(self.graph, [site.output, self.k.update, self.v.update]):
                grown = self.call(continuation_state, site.query, self.k.update, self.v.update, state_in, **kwargs)
                keys, values, state = self.items(grown, 3)
        self.hand_back(self.k.output, keys)
        self.hand_back(self.v.output, values)
        add_state(self.gm, StateSlot(self.name, state_in, self.k.input, state, keys,
                                     default=None if self.evict else _default_state(self.config)))
        if self.evict:
            return "decode eviction", f"decode eviction: {n} new tokens appended, the method keeps the cache's size"
        return "decode", "decode: the cache grows (decode eviction is off, or the method has no decode rule)"


def _apply_mask(graph: fx.Graph, site: AttentionSite, mask: fx.Node) -> None:
    """Make the site's attention use ``mask`` (B, 1, n, P + n) bool, True attends."""
    node = site.node
    if site.form == "sdpa":
        node.args = node.args[:3]
        node.kwargs = {**{k: v for k, v in node.kwargs.items() if k not in ("attn_mask", "is_causal")},
                       "attn_mask": mask, "is_causal": False}
        return
    if site.mask is None:
        raise ValueError(f"layer {site.layer}: the attention applies no mask to replace")
    with graph.inserting_after(mask):
        converted = {"bool_keep": mask, "bool_block": graph.call_function(operator.invert, (mask,))}.get(site.mask_how)
        if converted is None:  # additive
            converted = graph.call_function(torch.where, (mask, 0.0, float("-inf")))
    for user in list(site.mask.users):
        if user in _score_path(site):
            user.replace_input_with(site.mask, converted)


def _score_path(site: AttentionSite) -> set[fx.Node]:
    """The nodes between the q @ k^T matmul and the softmax of a matmul-form site."""
    path, node = set(), site.node.args[0]
    while isinstance(node, fx.Node) and op_name(node) not in ("matmul", "bmm"):
        path.add(node)
        node = node.args[0]
    return path


@register_pass(KVConfig)
def kv_eviction_pass(gm: fx.GraphModule, analysis: GraphAnalysis, config: KVConfig, ctx: PassContext) -> PassResult:
    """Rewrite every cached attention site of ``gm`` to keep what the config's method keeps."""
    result = PassResult(method=method_of(config)[1], family="kv")
    for skipped in analysis.skipped:
        if skipped.kind == "attention":
            result.sites[skipped.node] = f"not rewritten (skipped by the analysis: {skipped.reason})"
    sites = [s for s in analysis.attention if s.has_cache]
    if not sites:
        result.sites["graph"] = "no attention over a KV cache in this graph (use_cache off?): nothing to evict"
        return result
    if config.compression_ratio == 0 and not config.REREAD:  # a re-read still drops its own tokens
        result.sites["graph"] = "compression_ratio 0: nothing is evicted, the graph is unchanged"
        return result
    num_layers = max(s.layer for s in sites) + 1
    # one attention mask serves every full-attention layer: StaticCache buffers shrink only when all do
    static = [s for s in sites if s.k_cache.kind == "index_copy" and not s.cross]
    resize = bool(static) and cache.install() and all(_refusal(s, config) is None for s in static)
    bytes_before = bytes_after = 0
    symbolic = False
    for site in sites:
        name = site.name
        if site.cross:  # by design: the encoder's keys and values are not the decoder's to evict
            result.sites[name] = "cross-attention: its cache (the encoder's keys and values) is left as it is"
            continue
        reason = _refusal(site, config)
        if reason is not None:
            result.refuse(name, reason)
            continue
        rewrite = _Site(gm, site, config, ctx, num_layers, resize)
        n = example_value(site.query).shape[2]
        if site.k_cache.prefill and config.REREAD:
            kind, what = rewrite.keep_whole()
        elif config.REREAD and ctx.reread and n != 1:
            kind, what = rewrite.reread()
        elif site.k_cache.prefill:
            kind, what = rewrite.prefill()
        elif site.k_cache.kind == "index_copy" and n != 1:
            kind, what = rewrite.static_prompt()
        elif n == 1 and (rewrite.evict or site.k_cache.kind == "index_copy"):
            kind, what = rewrite.one_token()
        else:
            kind, what = rewrite.continuation()
        result.count(kind)
        if kind == "prefill eviction":
            length = n
            kept = config.budget(site.layer, num_layers, length)
            held = kept
            if rewrite.per_layer_budgets():
                budgets = [config.budget(layer, num_layers, length) for layer in range(num_layers)]
                held = max(budgets) if all(isinstance(b, int) for b in budgets) else "the widest layer's"
            slots = "" if held is kept else f" (in {held} slots: one attention mask serves every layer)"
            shared = " per KV head on average, shared by score (packed)" if config.packed else ""
            result.sites[name] = f"{what}: cache {length} -> {kept} tokens{shared}{slots}"
            per_token = site.kv_bytes_per_token() * example_value(site.query).shape[0]
            if all(isinstance(x, int) for x in (length, held, per_token)):
                bytes_before += per_token * length
                bytes_after += per_token * held
            else:
                symbolic = True
        else:
            result.sites[name] = what
    remove_dead_code(gm)
    if result.rewrites and not symbolic and bytes_before:
        result.kv_cache_bytes = {"before": bytes_before, "after": bytes_after}
    return result

