"""KVzip: a context compressed by the model re-reading it (``compile_sparse.compress_context``).
Identity at ratio 0, the exact budget and bytes (uniform and per-head), the kept tokens against a
reference from the eager model's attention during the re-read, a left-padded row as it is alone,
Inductor as the eager lowering, contexts of six lengths through one compiled forward, six
architectures of the zoo (sliding windows included), and clear errors and warnings off its path."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import compile_sparse
from compile_sparse import models
from compile_sparse.compress import reread_ids
from compile_sparse.methods.kvzip import KVzipConfig
from compile_sparse.passes.kv import scoring
from compile_sparse.passes.kv.packed import OWNER
from compile_sparse.state import STATE

from .architectures import build

T, PADS = 40, 7


class Tokenizer:
    """A stand-in for a tokenizer without a chat template: ids inside the tiny models' vocabulary."""

    chat_template = None
    pad_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [3 + ord(c) % 100 for c in text]


TOKENIZER = Tokenizer()


def batch():
    """Two rows of T tokens, the second left-padded (its first PADS are padding)."""
    input_ids = torch.randint(3, 128, (2, T), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(input_ids)
    mask[1, :PADS] = 0
    return input_ids, mask


def compress(model, input_ids, mask=None, lowering="eager", **params):
    compiled = torch.compile(model.forward, backend="sparse",
                             options={"kv": {"method": "kvzip", **params}, "lowering": lowering})
    cache, logits = compile_sparse.compress_context(compiled, TOKENIZER, input_ids, mask)
    return cache, logits, compiled


def positions_of(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)  # generate()'s: each row counts its real tokens


def kept_positions(layer):
    """(B, Hkv, K) the true position of each slot (-1: empty), from the state the backend keeps."""
    return STATE.store.get(layer.keys)[..., 0]


@pytest.mark.parametrize("head_budgets", ["uniform", "adaptive"])
def test_ratio_zero_answers_exactly_as_dense(head_budgets):
    """At ratio 0 the re-read keeps every token and drops its own: a question and three decode steps
    over the cache give dense's logits, padded row included."""
    model = models.tiny_llama()
    input_ids, mask = batch()
    cache, logits, compiled = compress(model, input_ids, mask, compression_ratio=0.0, head_budgets=head_budgets)
    assert [layer.keys.shape[-2] for layer in cache.layers] == [T, T]
    follow = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(1))  # a 5-token question, 3 steps
    start = mask.sum(-1, keepdim=True)
    with torch.no_grad():
        full_mask = torch.cat([mask, torch.ones_like(follow)], dim=-1)
        dense = model(input_ids=torch.cat([input_ids, follow], dim=-1), attention_mask=full_mask,
                      position_ids=positions_of(full_mask)).logits  # (2, T + 8, V)
        mine = [compiled(input_ids=follow[:, :5], past_key_values=cache, position_ids=start + torch.arange(5),
                         use_cache=True).logits]
        for step in range(5, 8):
            mine.append(compiled(input_ids=follow[:, step:step + 1], past_key_values=cache,
                                 position_ids=start + step, use_cache=True).logits)
    torch.testing.assert_close(logits, dense[:, T - 1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(mine, dim=1), dense[:, T:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head_budgets", ["uniform", "adaptive"])
def test_generate_continues_from_the_compressed_context(head_budgets):
    """generate() answers over compress_context's cache given the question's ids and the mask of
    context and question (padded row included): each step's logits are those of a greedy decode at
    explicit true positions over the same cache (at ratio 0, dense generate()'s over the whole
    prompt), and the cache then holds the budget, the question and the tokens generated but the last."""
    model = models.tiny_llama()
    model.generation_config.pad_token_id = 0
    input_ids, mask = batch()
    question = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    full_mask = torch.cat([mask, torch.ones_like(question)], dim=-1)
    steps = 6
    greedy = dict(max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        dense = model.generate(input_ids=torch.cat([input_ids, question], dim=-1), attention_mask=full_mask, **greedy)
    for ratio in (0.0, 0.5):
        torch.compiler.reset()  # the reference's calls and generate()'s compile apart (their arguments differ)
        reference, _, compiled = compress(model, input_ids, mask, compression_ratio=ratio, head_budgets=head_budgets)
        ids, position, expected = question, mask.sum(-1, keepdim=True) + torch.arange(5), []
        with torch.no_grad():
            for _ in range(steps):
                logits = compiled(input_ids=ids, past_key_values=reference, position_ids=position,
                                  use_cache=True).logits[:, -1]  # (2, V)
                expected.append(logits)
                ids, position = logits.argmax(-1, keepdim=True), position[:, -1:] + 1
            torch.compiler.reset()
            cache, _, compiled = compress(model, input_ids, mask, compression_ratio=ratio, head_budgets=head_budgets)
            dense_forward, model.forward = model.forward, compiled
            try:
                out = model.generate(input_ids=question, attention_mask=full_mask, past_key_values=cache, **greedy)
            finally:
                model.forward = dense_forward
        torch.testing.assert_close(torch.stack(out.logits, 1), torch.stack(expected, 1), atol=1e-5, rtol=1e-5)
        if ratio == 0:
            torch.testing.assert_close(torch.stack(out.logits, 1), torch.stack(dense.logits, 1), atol=1e-5, rtol=1e-5)
        assert cache.get_seq_length() == int(T * (1 - ratio)) + 5 + steps - 1


@pytest.mark.parametrize("head_budgets", ["uniform", "adaptive"])
def test_the_cache_holds_exactly_the_budget(head_budgets):
    """At 0.5 every layer holds floor(T / 2) slots per KV head, the bytes of that many tokens; each
    row keeps the budget of its own real tokens (the padded row 16 of its 33), per head (uniform) or
    in all its heads together, each slot owned by one head (adaptive)."""
    model = models.tiny_llama()
    input_ids, mask = batch()
    cache, _, _ = compress(model, input_ids, mask, compression_ratio=0.5, head_budgets=head_budgets)
    hkv, d = 2, 16
    for layer in cache.layers:
        assert layer.keys.shape == layer.values.shape == (2, hkv, T // 2, d)
        assert layer.keys.numel() * layer.keys.element_size() == 2 * hkv * (T // 2) * d * 4
        position = kept_positions(layer)
        real = position >= 0
        budgets = [T // 2, (T - PADS) // 2]
        if head_budgets == "uniform":
            assert real.sum(-1).tolist() == [[b] * hkv for b in budgets]
        else:
            owner = STATE.store.get(layer.keys)[..., OWNER]
            assert real.sum(dim=(1, 2)).tolist() == [hkv * b for b in budgets]
            assert ((owner >= 0) == real).all() and owner.max() < hkv
            floor = [int(0.2 * b) for b in budgets]  # head_floor: each head keeps at least this many
            for row in range(2):
                counts = [int(((owner[row] == h) & real[row]).sum()) for h in range(hkv)]
                assert min(counts) >= floor[row] and sum(counts) == hkv * budgets[row]
        assert (position.amax(dim=(1, 2)) < torch.tensor([T, T - PADS])).all()  # the re-read's tokens are gone


@pytest.mark.parametrize("kernel_size", [1, 5])
def test_kept_tokens_match_the_reread_attention_reference(kernel_size, monkeypatch):
    """Each KV head keeps the top budget of the largest attention the eager model's re-read queries
    (and the query heads of its group) pay each context token, pooled over ``kernel_size``, the
    first 4 tokens kept."""
    monkeypatch.setattr(scoring, "SCORE_CHUNK", 16)  # the re-read's queries in several chunks
    heads, kv_heads = 6, 2
    reference = models.tiny_llama(heads=heads, kv_heads=kv_heads, attn_implementation="eager")
    model = models.tiny_llama(heads=heads, kv_heads=kv_heads)  # same seed: same weights, SDPA attention
    input_ids = batch()[0][:1]
    cache, _, _ = compress(model, input_ids, compression_ratio=0.5, kernel_size=kernel_size)
    reread, _ = reread_ids(TOKENIZER, input_ids, torch.ones_like(input_ids))
    with torch.no_grad():
        dense = reference(input_ids=input_ids, use_cache=True).past_key_values
        out = reference(input_ids=reread, past_key_values=dense, position_ids=T + torch.arange(reread.shape[1])[None],
                        use_cache=True, output_attentions=True)
    for probs, layer in zip(out.attentions, cache.layers):  # probs (1, H, R, T + R)
        scores = probs[..., :T].amax(dim=2).view(1, kv_heads, heads // kv_heads, T).amax(dim=2)  # (1, Hkv, T)
        if kernel_size > 1:
            scores = F.avg_pool1d(scores, kernel_size, stride=1, padding=kernel_size // 2, count_include_pad=False)
        scores[..., :4] = float("inf")
        expected = scores.topk(T // 2, dim=-1).indices.sort(dim=-1).values.float()
        assert torch.equal(kept_positions(layer), expected)


def test_a_padded_row_keeps_what_it_keeps_alone():
    model = models.tiny_llama()
    input_ids, mask = batch()
    together, _, _ = compress(model, input_ids, mask, compression_ratio=0.5)
    alone, _, _ = compress(model, input_ids[1:, PADS:], compression_ratio=0.5)
    budget = (T - PADS) // 2
    for mine, theirs in zip(together.layers, alone.layers):
        assert torch.equal(kept_positions(mine)[1, :, :budget], kept_positions(theirs)[0])
        assert (kept_positions(mine)[1, :, budget:] == -1).all()
        torch.testing.assert_close(mine.keys[1, :, :budget], theirs.keys[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mine.values[1, :, :budget], theirs.values[0], atol=1e-5, rtol=1e-5)


def test_through_inductor_it_keeps_what_the_eager_lowering_keeps():
    model = models.tiny_llama()
    input_ids, mask = batch()
    params = dict(compression_ratio=0.75, head_budgets="adaptive", kernel_size=3)
    eager, eager_logits, _ = compress(model, input_ids, mask, **params)
    torch.compiler.reset()
    inductor, logits, _ = compress(model, input_ids, mask, lowering="inductor", **params)
    torch.testing.assert_close(logits, eager_logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(eager.layers, inductor.layers):
        mine, theirs = STATE.store.get(b.keys), STATE.store.get(a.keys)
        assert torch.equal(mine[..., 0], theirs[..., 0]) and torch.equal(mine[..., OWNER], theirs[..., OWNER])
        torch.testing.assert_close(mine, theirs)  # the priorities: the scores, to rounding
        torch.testing.assert_close(b.keys, a.keys, atol=1e-5, rtol=1e-5)


def test_contexts_of_many_lengths_through_one_compiled_forward():
    """Six context lengths (two left-padded) through one Inductor-compiled forward: every cache holds
    its budget, with no warning of ours (a recompile per length would pass Dynamo's limit of 8 and
    run the rest dense: "strict" makes that an error)."""
    model = models.tiny_llama()
    torch.compiler.reset()
    compiled = torch.compile(model.forward, backend="sparse",
                             options={"kv": {"method": "kvzip", "compression_ratio": 0.5}, "strict": True})
    generator = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", compile_sparse.SparseWarning)
        for length, pads in [(24, 0), (31, 0), (40, 5), (47, 0), (56, 9), (63, 0)]:
            input_ids = torch.randint(3, 128, (2, length), generator=generator)
            mask = torch.ones_like(input_ids)
            mask[1, :pads] = 0
            cache, _ = compile_sparse.compress_context(compiled, TOKENIZER, input_ids, mask)
            for layer in cache.layers:
                assert layer.keys.shape[2] == length // 2
                real = (kept_positions(layer) >= 0).sum(-1)  # (2, Hkv)
                assert real.tolist() == [[length // 2] * 2, [(length - pads) // 2] * 2], (length, real)


def test_off_its_path_it_says_so():
    """generate() prefills without the re-read: the whole prompt stays, with a warning (an error with
    strict); explain says what the prefill does; a method without a re-read cannot compress_context;
    a StaticCache is refused with the reason; bad parameters name the value."""
    model = models.tiny_llama()
    input_ids = batch()[0]
    model.forward, forward = torch.compile(model.forward, backend="sparse", options={
        "kv": {"method": "kvzip", "compression_ratio": 0.5}}), model.forward
    try:
        with pytest.warns(compile_sparse.SparseWarning, match="keeps every token of a prompt prefilled outside "
                          "compile_sparse.compress_context"):
            out = model.generate(input_ids, max_new_tokens=2, do_sample=False, pad_token_id=0,
                                 return_dict_in_generate=True)
        assert [layer.keys.shape[-2] for layer in out.past_key_values.layers] == [T + 1] * 2
        with pytest.warns(compile_sparse.SparseWarning, match="a StaticCache: the method re-reads its context"):
            model.generate(input_ids, max_new_tokens=2, do_sample=False, pad_token_id=0,
                           cache_implementation="static")
    finally:
        model.forward = forward
    strict = torch.compile(model.forward, backend="sparse", options={
        "kv": {"method": "kvzip", "compression_ratio": 0.5}, "strict": True, "lowering": "eager"})
    with pytest.raises(compile_sparse.StrictError, match="compress_context"), torch.no_grad():
        strict(input_ids=input_ids, use_cache=True)
    report = compile_sparse.explain(model, input_ids=input_ids, use_cache=True,
                                    options={"kv": {"method": "kvzip", "compression_ratio": 0.5}})
    assert report.passes[0]["rewrites"] == {"prefill kept whole": 2}
    tova = torch.compile(model.forward, backend="sparse", options={"kv": {"method": "tova", "compression_ratio": 0.5},
                                                                   "lowering": "eager"})
    with pytest.raises(RuntimeError, match="the context's re-read ran no graph of a re-read method"):
        compile_sparse.compress_context(tova, TOKENIZER, input_ids)
    with pytest.raises(ValueError, match="n_sink must be an int >= 0, got -1"):
        KVzipConfig(n_sink=-1)
    with pytest.raises(ValueError, match="kernel_size"):
        KVzipConfig(kernel_size=4)


SLIDING = {"gemma3": [True, False], "gemma2": [True, False], "mistral": [True, True]}  # which layers slide


@pytest.mark.parametrize("name", ["gemma3", "gemma2", "mistral", "gpt2", "falcon_multi_query", "phi"])
def test_architectures_answer_as_dense_at_zero_and_keep_the_budget(name):
    """Across the zoo's kinds of attention (Conv1D with a fused projection, one KV head, partial
    rotary, logit softcapping, sliding windows): at ratio 0 a question over the cache answers as
    dense does; at 0.5 each full-attention layer holds its budget. A sliding-window layer is not
    compressed (warned: HF's window rule) and must not keep the re-read's tokens: it holds what the
    context's dense prefill left (mistral: every layer slides, nothing to compress, the cache is
    the context's)."""
    model = build(name).eval()
    input_ids, mask = batch()
    question = torch.randint(3, 100, (2, 4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        context = model(input_ids=input_ids, attention_mask=mask, position_ids=positions_of(mask),
                        use_cache=True).past_key_values
        full = torch.cat([mask, torch.ones_like(question)], dim=-1)
        dense = model(input_ids=torch.cat([input_ids, question], dim=-1), attention_mask=full,
                      position_ids=positions_of(full)).logits
    for ratio in (0.0, 0.5):
        STATE.warned.clear()  # said once per cause in the process: each compile says it here
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cache, _, compiled = compress(model, input_ids, mask, compression_ratio=ratio)
        said = [str(w.message) for w in caught if issubclass(w.category, compile_sparse.SparseWarning)]
        assert any("sliding-window layer" in m for m in said) == (name in SLIDING), said
        for layer, prefilled in zip(cache.layers, context.layers):
            if layer.is_sliding:  # the context's last tokens, as the dense prefill left them
                assert layer.keys.shape[-2] < T
                torch.testing.assert_close(layer.keys, prefilled.keys, atol=1e-6, rtol=1e-5)
                torch.testing.assert_close(layer.values, prefilled.values, atol=1e-6, rtol=1e-5)
            else:
                assert layer.keys.shape[-2] == int(T * (1 - ratio))
        if ratio == 0:
            with torch.no_grad():
                answer = compiled(input_ids=question, past_key_values=cache, use_cache=True,
                                  position_ids=mask.sum(-1, keepdim=True) + torch.arange(4)).logits
            torch.testing.assert_close(answer, dense[:, T:], atol=1e-5, rtol=1e-5)
    assert [layer.is_sliding for layer in cache.layers] == SLIDING.get(name, [False, False])


def test_ctx_continuation_compresses_through_the_reread():
    """The continuation protocol prefills a KVzip setting with compress_context: at ratio 0 dense's
    perplexity, at 0.5 half the context cached."""
    from compile_sparse import eval as ev

    model = models.tiny_llama()
    generator = torch.Generator().manual_seed(5)
    docs = {f"doc{i}": torch.randint(3, 128, (1, 32), generator=generator) for i in range(2)}
    dense = ev.dense_ppl(model, docs, context=24)
    for ratio, tokens in ((0.0, 24), (0.5, 12)):
        compiled = ev.compiled_forward(model, {"kv": {"method": "kvzip", "compression_ratio": ratio}, "lowering": "eager"})
        result = ev.ctx_continuation("kvzip", ev.reread_prefill(compiled, TOKENIZER), ev.model_forward(compiled), docs,
                                     dense, context=24)
        assert result.cache_tokens == [tokens, tokens]
        assert (result.ppl_ratio == pytest.approx(1.0, rel=1e-5)) == (ratio == 0)


def test_cli_retrieval_runs_kvzip_through_compress_context(tmp_path):
    """SmolLM2's chat template (its header left out of the re-read), query-agnostic: at ratio 0 the
    answers are dense's; at 0.75 the measured share removed is the ratio."""
    import json

    from compile_sparse.cli import main

    out = tmp_path / "retrieval.json"
    assert main(["eval", "smollm2", "--protocol", "retrieval", "--tasks", "single_needle", "--cases", "1", "--length",
                 "384", "--setting", "query-agnostic", "--method", "kvzip", "--ratios", "0.0", "0.75",
                 "--json", str(out), "--quiet"]) == 0
    identity, compressed = json.loads(out.read_text())["settings"]
    assert identity["answers"] == identity["answers_dense"] and identity["kv_removed"] == 0.0
    assert abs(compressed["kv_removed"] - 0.75) < 0.01 and len(compressed["answers"]) == 1
