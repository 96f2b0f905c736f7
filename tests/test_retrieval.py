"""The retrieval protocol: its cases (exact lengths, fixed seeds, answers stated in the prompt), the
replay of a KV method's eviction (the same kept tokens as the compiled graph), and the CLI's JSON."""

import json
import re
import warnings
from collections import Counter

import pytest
import torch

import compile_sparse
from compile_sparse import models, retrieval
from compile_sparse.cli import main
from compile_sparse.passes.registry import build

from .methods import kv_options, names


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(models.smollm2_dir())


@pytest.fixture(scope="module")
def haystack(tokenizer):
    return retrieval.Haystack(tokenizer)


@pytest.mark.parametrize("length", [512, 1024])
@pytest.mark.parametrize("task", retrieval.TASKS)
def test_cases_have_the_exact_length_and_state_their_answers(task, length, haystack, tokenizer):
    cases = [retrieval.make_case(task, i, haystack, length) for i in range(3)]
    assert [c.prompt.shape for c in cases] == [(1, length)] * 3
    again = retrieval.make_case(task, 1, haystack, length)
    assert torch.equal(again.prompt, cases[1].prompt) and again.answers == cases[1].answers  # fixed seeds
    assert not torch.equal(cases[0].prompt, cases[1].prompt)
    context, question = tokenizer.decode(cases[0].context[0]), tokenizer.decode(cases[0].question[0])
    assert question.rstrip().endswith(("is", "are", "are:", "they are:"))
    if task == "common_words":  # every answer occurs more often than any other listed word
        counts = Counter(re.findall(r"\n\d+\. (\w+)", context))
        rest = max(n for w, n in counts.items() if w not in cases[0].answers)
        assert min(counts[a] for a in cases[0].answers) > rest
    else:
        for answer in cases[0].answers:
            assert context.count(answer) >= 1, (answer, task)
        assert len(cases[0].answers) == {"single_needle": 1, "multi_key": 1, "multi_value": retrieval.NEEDLES,
                                         "variable_tracking": retrieval.CHAIN}[task]
    if len(cases[0].answers) > 1:  # room for the answers as a numbered list (the model's way), twice over
        listed = "\n".join(f"{i}. {a}" for i, a in enumerate(cases[0].answers, 1))
        assert cases[0].max_new_tokens == 2 * len(tokenizer.encode(listed, add_special_tokens=False))


def test_held_out_cases_start_where_asked(tokenizer):
    held_out = retrieval.make_cases(tokenizer, ("single_needle", "multi_key"), 512, 2, first=100)
    hay = retrieval.Haystack(tokenizer)
    expected = [retrieval.make_case(task, i, hay, 512) for task in ("single_needle", "multi_key") for i in (100, 101)]
    assert [torch.equal(a.prompt, b.prompt) for a, b in zip(held_out, expected)] == [True] * 4
    with pytest.raises(ValueError, match="first case -1: must be >= 0"):
        retrieval.make_cases(tokenizer, ("single_needle",), 512, 1, first=-1)


def test_bad_task_and_setting_are_errors(tokenizer):
    with pytest.raises(ValueError, match="unknown retrieval task 'needle'; valid: single_needle"):
        retrieval.make_cases(tokenizer, ("needle",), 512, 1)
    with pytest.raises(ValueError, match="unknown retrieval setting 'aware'"):
        retrieval.run(None, tokenizer, [], [], "aware")
    with pytest.raises(ValueError, match="too short for task multi_value"):
        retrieval.make_cases(tokenizer, ("multi_value",), 120, 1)


def test_scoring_is_every_answer_in_the_text():
    assert retrieval.is_correct(" 1234567.", ["1234567"])
    assert not retrieval.is_correct(" 123456.", ["1234567"])
    assert retrieval.is_correct("A, b and C", ["a", "B", "c"])
    assert not retrieval.is_correct("A and C", ["a", "B", "c"])


@pytest.mark.parametrize("setting", retrieval.SETTINGS)
@pytest.mark.parametrize("method", names("kv", REREAD=False))
def test_the_replay_keeps_what_the_compiled_prefill_keeps(method, setting):
    """For every KV method: the cache replayed from one captured dense prefill equals, layer by
    layer, the cache the compiled model leaves after prefilling the same tokens (the whole prompt,
    query-aware; the context, query-agnostic), but for the empty slots that pad a layer to the widest
    layer's budget there; at ratio 0 it is the dense cache."""
    model = models.tiny_llama(heads=6, kv_heads=2)
    prompt = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(3))
    observed = 48 if setting == "query-aware" else 40
    captured = retrieval.capture(model, prompt)
    compiled = torch.compile(model.forward, backend="sparse", options={"kv": kv_options(method, 0.5), "lowering": "eager"})
    with torch.no_grad():
        expected = compiled(input_ids=prompt[:, :observed], use_cache=True).past_key_values
        replayed, kept = retrieval.replayed_cache(model, captured, build("kv", method, {
            k: v for k, v in kv_options(method, 0.5).items() if k != "method"}), observed)
        identity, _ = retrieval.replayed_cache(model, captured, build("kv", method, {}), observed)
        dense = model(input_ids=prompt[:, :observed], use_cache=True).past_key_values
    for mine, theirs, positions in zip(replayed.layers, expected.layers, kept):
        slots = mine.keys.shape[2]  # the compiled cache pads a layer to the widest budget (pyramidkv): empty slots
        torch.testing.assert_close(mine.keys, theirs.keys[:, :, :slots])
        torch.testing.assert_close(mine.values, theirs.values[:, :, :slots])
        assert not theirs.keys[:, :, slots:].any()
        assert positions.shape == mine.keys.shape[:3] and (positions < observed).all()
    for mine, theirs in zip(identity.layers, dense.layers):
        torch.testing.assert_close(mine.keys, theirs.keys)
        assert mine.keys.shape[-2] == observed


class _Ids:
    """A tokenizer for random-id models: token ids as text."""

    eos_token_id = unk_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))

    def convert_tokens_to_ids(self, token):
        return None


def test_a_token_method_runs_compiled_beside_a_replayed_kv_method():
    """LazyLLM (token dropping) runs through the compiled model case by case, two settings of it
    one after the other (the second compiled after the first decoded: its prompt length must stay
    static, or the token pass would leave the graph dense); its KV removed is measured from its
    cache and its truncation baseline runs at that share; H2O is replayed."""
    model = models.tiny_llama()
    generator = torch.Generator().manual_seed(5)
    cases = [retrieval.Case("single_needle", torch.randint(0, 128, (1, 40), generator=generator),
                            torch.randint(0, 128, (1, 8), generator=generator), ["7"], 4) for _ in range(2)]
    lazy = {"tokens": {"method": "lazyllm", "layers": [1], "keep_ratios": [0.5], "window": 4}}
    lazier = {"tokens": {"method": "lazyllm", "layers": [1], "keep_ratios": [0.25], "window": 4}}
    compiled = []

    def compile_setting(options):
        compiled.append(options)
        return retrieval.compiled_setting(model, options)

    with warnings.catch_warnings():
        warnings.simplefilter("error", compile_sparse.SparseWarning)  # nothing left dense
        dense, truncate, (tokens, fewer, kv) = retrieval.run(model, _Ids(), cases,
                                                             [lazy, lazier, {"kv": kv_options("h2o", 0.5)}],
                                                             "query-aware", compile_setting)
    assert compiled == [lazy, lazier]
    assert tokens.kv_removed == pytest.approx(0.25)  # layer 1 of 2 caches half the prompt
    assert fewer.kv_removed == pytest.approx(0.375)  # layer 1 of 2 caches a quarter
    assert kv.kv_removed == pytest.approx(0.5)
    assert sorted(truncate) == [0.25, 0.375, 0.5]
    assert [len(o.texts) for o in (dense, tokens, fewer, kv, *truncate.values())] == [2] * 7


def test_a_token_method_compresses_contexts_of_every_length():
    """Query-agnostic: contexts of two lengths through one compiled setting; each is compressed
    (a graph per length: the token pass needs static lengths), the question fed after it."""
    model = models.tiny_llama()
    generator = torch.Generator().manual_seed(6)
    cases = [retrieval.Case("single_needle", torch.randint(0, 128, (1, n), generator=generator),
                            torch.randint(0, 128, (1, 8), generator=generator), ["7"], 4) for n in (40, 48)]
    lazy = {"tokens": {"method": "lazyllm", "layers": [1], "keep_ratios": [0.5], "window": 4}}
    with warnings.catch_warnings():
        warnings.simplefilter("error", compile_sparse.SparseWarning)  # nothing left dense
        _, _, (tokens,) = retrieval.run(model, _Ids(), cases, [lazy], "query-agnostic")
    assert tokens.kept == [0.75, 0.75]  # layer 1 of 2 caches half of each context


def test_capture_restores_the_attention_and_refuses_sliding_windows():
    model = models.tiny_llama()
    retrieval.capture(model, torch.randint(0, 128, (1, 16)))
    assert model.config._attn_implementation == "sdpa"
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, sliding_window=8)
    with pytest.raises(ValueError, match="sliding-window layers"):
        retrieval.capture(MistralForCausalLM(config).eval(), torch.randint(0, 64, (1, 16)))


def test_allocations_keep_the_same_number_of_keys_where_the_scores_are_highest():
    torch.manual_seed(0)
    scores = [torch.rand(1, 3, 40) * (layer + 1) for layer in range(3)]  # layer 2 scores highest
    uniform = retrieval.allocate(scores, 8)
    assert [k.sum(-1).tolist() for k in uniform] == [[[8, 8, 8]]] * 3
    assert all(torch.equal(k, retrieval.top_mask(s, 8)) for k, s in zip(uniform, scores))
    heads = retrieval.allocate(scores, 8, "heads", floor=0.5)
    assert [int(k.sum()) for k in heads] == [24] * 3 and min(int(n) for k in heads for n in k.sum(-1).flatten()) >= 4
    for k, s in zip(heads, scores):  # beyond each head's 4, the layer's highest scores
        rest = s.masked_fill(retrieval.top_mask(s, 4), float("-inf")).flatten()
        assert torch.equal(k.flatten(), retrieval.top_mask(s, 4).flatten() | retrieval.top_mask(rest, 12))
    layers = retrieval.allocate(scores, 8, "layers")
    everything = torch.cat([s.flatten() for s in scores])
    assert torch.equal(torch.cat([k.flatten() for k in layers]), retrieval.top_mask(everything, 72))
    assert int(layers[2].sum()) > 24 > int(layers[0].sum())  # the budget moved to the layer that scores highest
    counts = retrieval.layer_budgets(scores, 8)  # (1, 3): per head, each layer's share of those 72 slots
    assert int(counts.sum()) == 24 and counts[0].tolist() == sorted(counts[0].tolist())
    assert (counts[0].double() - torch.tensor([int(k.sum()) / 3 for k in layers])).abs().max() < 1
    budgets = retrieval.allocate(scores, 8, "layer-budgets")
    assert [k.sum(-1).tolist() for k in budgets] == [[[n] * 3] for n in counts[0].tolist()]
    assert all(torch.equal(k, retrieval.top_mask(s, int(n))) for k, s, n in zip(budgets, scores, counts[0]))
    with pytest.raises(ValueError, match="'rows'"):
        retrieval.allocate(scores, 8, "rows")
    with pytest.raises(ValueError, match="1.5"):
        retrieval.allocate(scores, 8, "heads", floor=1.5)


def test_masked_attention_equals_a_cache_of_the_kept_keys():
    """Hiding each head's evicted keys (the masked studies) gives the logits of a cache that holds
    only the kept ones, for a prompt of several tokens fed after them; keeping every key is dense."""
    model = models.tiny_llama()
    context, question = torch.randint(0, 128, (1, 24)), torch.randint(0, 128, (1, 5))
    captured = retrieval.capture(model, context)
    positions = torch.arange(24, 29)[None]  # (1, 5)

    def logits(cache):
        return model(input_ids=question, past_key_values=cache, position_ids=positions, use_cache=True).logits

    with torch.no_grad():
        kept = retrieval.allocate([torch.rand(1, 2, 24) for _ in captured.sites], 10)
        gathered = retrieval.kept_cache(model, captured, 24, kept)
        assert [layer.keys.shape[2] for layer in gathered.layers] == [10, 10]
        first = kept[0][0, 0].nonzero()[:, 0]  # the kept positions of layer 0, head 0
        assert torch.equal(gathered.layers[0].keys[0, 0], captured.sites[0].key[0, 0, first])
        with retrieval.masked(model, kept):
            masked = logits(retrieval.dense_cache(model, captured, 24))
        torch.testing.assert_close(masked, logits(gathered))
        with retrieval.masked(model, [torch.ones(1, 2, 24, dtype=torch.bool)] * 2):
            every = logits(retrieval.dense_cache(model, captured, 24))
        torch.testing.assert_close(every, logits(retrieval.dense_cache(model, captured, 24)))
    assert model.config._attn_implementation == "sdpa" and retrieval.masked_attention.kept == {}


def test_cli_retrieval_json_on_smollm2(tmp_path):
    """Dense, truncation and settings on two 384-token single-needle cases, query-agnostic (the
    question fed over the compressed context); at ratio 0 a method answers exactly what dense
    answers."""
    out = tmp_path / "retrieval.json"
    assert main(["eval", "smollm2", "--protocol", "retrieval", "--tasks", "single_needle", "--cases", "2",
                 "--length", "384", "--setting", "query-agnostic", "--method", "h2o", "--ratios", "0.0", "0.75",
                 "--json", str(out), "--quiet"]) == 0
    data = json.loads(out.read_text())
    for key in ("model", "protocol", "options", "accuracy", "accuracy_dense", "accuracy_truncate", "tasks"):
        assert key in data
    assert data["accuracy_dense"] == 1.0  # SmolLM2 finds these needles
    assert set(data["tasks"]) == {"single_needle"}
    identity, compressed = data["settings"]
    assert identity["answers"] == identity["answers_dense"] and identity["accuracy_truncate"] is None
    assert identity["kv_removed"] == 0.0 and abs(compressed["kv_removed"] - 0.75) < 0.01  # measured from the cache
    assert 0.0 <= compressed["accuracy_truncate"] <= 1.0
    assert compressed["retrieval_setting"] == "query-agnostic" and len(compressed["answers"]) == 2


def test_cli_retrieval_runs_per_head_budgets_through_the_compiled_graph(tmp_path):
    """A packed cache (per-head budgets) is read by the compiled graph only: its settings are not
    replayed but prefilled and answered through the compiled forward. At ratio 0 the answers are
    dense's; with a floor of 1 (every head its own budget) they are the uniform heads' (replayed),
    at the same measured share (a packed cache read by HF's own attention answers garbage)."""
    out = tmp_path / "retrieval.json"
    tova = {"method": "tova", "kernel_size": 15, "per_head": True}
    packed = {**tova, "head_budgets": "adaptive", "head_floor": 1.0}
    settings = [{**packed, "compression_ratio": 0.0}, {**tova, "compression_ratio": 0.5}, {**packed, "compression_ratio": 0.5}]
    assert main(["eval", "smollm2", "--protocol", "retrieval", "--tasks", "single_needle", "--cases", "2", "--length",
                 "384", *[arg for kv in settings for arg in ("--options", json.dumps({"kv": kv}))],
                 "--json", str(out), "--quiet"]) == 0
    identity, uniform, floor_one = json.loads(out.read_text())["settings"]
    assert identity["answers"] == identity["answers_dense"] and identity["kv_removed"] == 0.0
    assert floor_one["answers"] == uniform["answers"] and floor_one["kv_removed"] == uniform["kv_removed"] == 0.5
    # (a floor of 1 packs as uniform heads do; any other floor must not reach the replay)
    assert retrieval.kv_config({"kv": {**packed, "head_floor": 0.2}}) is None
    assert retrieval.kv_config({"kv": tova}) is not None
