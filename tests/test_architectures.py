"""The zoo matrix: every architecture of tests/architectures.py x every registered method it
applies to, each architecture compiled once (``Matrix``) for all of them.

- every architecture: the analysis counts equal the config (layers, query / KV heads, head dim,
  MLP width; MoE experts reported per layer);
- every architecture x data-free prune criterion: identity at 0, exact shapes at 0.5, or the reason
  it is refused, as the table's ``limits`` say;
- decoders x KV methods (every decoder with one method of each kind of scorer, the methods of a kind
  taking turns over the architectures: ``kv_pairs``): an 8-token ``generate()`` on the cache the model builds itself equals
  dense at ratio 0 (tokens and logits); at 0.5 every full-attention layer keeps exactly its budget
  (sliding-window layers keep HF's window rule and are refused with the reason); the same with
  per-head budgets (a packed cache), a method with a decode rule and one without taking turns;
- encoder-decoders x KV methods (the same way): the decoder's self-attention cache keeps the budget, the
  cross-attention cache (the encoder's keys) is left as it is;
- encoders (and the encoders of encoder-decoders) x encoder token methods: identity at keep 1,
  exactly the kept share of tokens at 0.75.
"""

import pytest
import torch

import compile_sparse
from compile_sparse.passes.kv.packed import OWNER
from compile_sparse.passes.kv.scoring import POSITION
from compile_sparse.passes.registry import config_class
from compile_sparse.state import STATE

from .architectures import ARCHITECTURES, Matrix, build, by_kind, expected, forward_inputs, inputs
from .methods import kv_options, names

KV_METHODS = names("kv", REREAD=False)  # a re-read method (kvzip) compresses in compress_context: tests/test_kvzip.py
TOKEN_METHODS = names("tokens", CAUSAL=False)  # the encoder methods (lazyllm is for decoders)
DATA_FREE = {**{name: ({"mlp_ratio": 0.0, "head_ratio": 0.0}, {"mlp_ratio": 0.5, "head_ratio": 0.5})
                for name in names("prune", NEEDS="weights", BIAS_COMPENSATION=False)},
             "nm": ({"criterion": "magnitude", "n": 4, "m": 4}, {"criterion": "magnitude"})}
PROMPT = 24


def architectures(*kinds):
    """Parametrize ``name`` over the architectures of ``kinds`` (all by default), grouped: pytest
    runs each architecture's tests one after the other (module scope) and pytest-xdist on one
    worker, so it is compiled once for all of them."""
    chosen = by_kind(*kinds) if kinds else list(ARCHITECTURES)
    return pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.xdist_group(name)) for name in chosen],
                                   scope="module")


def kv_pairs(kind):
    """Parametrize ``name`` and ``method``: every architecture of ``kind`` with one KV method of each
    kind of scorer (what it reads of the attention, whether it has a decode rule and state), the
    methods of a kind taking turns over the architectures, so that every method runs on several
    architectures and every architecture meets every kind (every pair would add minutes to the
    suite). Grouped by architecture, as ``architectures``."""
    kinds = {}
    for method in KV_METHODS:
        config = config_class("kv", method)
        kinds.setdefault((config.OBSERVES, config.SUPPORTS_DECODE, config.STATE_SIZE > 0), []).append(method)
    pairs = [(name, members[i % len(members)]) for i, name in enumerate(by_kind(kind)) for members in kinds.values()]
    return pytest.mark.parametrize("name,method", [pytest.param(name, method, marks=pytest.mark.xdist_group(name))
                                                   for name, method in pairs])


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Replaces conftest's reset before every test: an architecture stays compiled across the
    methods (``compiled`` resets when it builds the next one)."""
    yield


@pytest.fixture(scope="module")
def compiled():
    """name -> (model with its forward compiled by a Matrix, the same model uncompiled, the Matrix)."""
    made = {}

    def get(name):
        if name not in made:
            made.clear()
            torch.compiler.reset()  # one architecture at a time: HF's forward wrapper is shared code
            model, dense, matrix = build(name), build(name), Matrix()
            model.forward = torch.compile(type(model).forward.__get__(model), backend=matrix)
            made[name] = model, dense, matrix
        return made[name]

    yield get
    torch.compiler.reset()


def _output(out):
    return out[0]  # logits, or an encoder's last hidden state


def _run(compiled, name, options):
    """One forward without a cache under ``options``: (output, the dense output, this graph's report,
    the rewritten graph and its example inputs)."""
    model, dense, matrix = compiled(name)
    kwargs = forward_inputs(name)
    matrix.options = options
    with torch.no_grad():
        got, want = _output(model(**kwargs)), _output(dense(**kwargs))
    [(_, graph, example_inputs)] = [g for g in matrix.graphs if g[0] == options]
    [report] = matrix.reports_for(options)
    return got, want, report, graph, example_inputs


@architectures()
def test_analysis_counts_equal_the_config(name, compiled):
    model = compiled(name)[0]
    report = _run(compiled, name, {"kv": None})[2]  # analysis only
    want = expected(model.config)
    arch = ARCHITECTURES[name]
    stacks = 2 if arch.kind == "seq2seq" else 1
    sites = report.analysis["attention_sites"]
    self_attention = [s for s in sites if not s["cross"]]
    assert len(self_attention) == want["layers"] * stacks, [s["name"] for s in sites]
    assert len(sites) - len(self_attention) == (want["layers"] if arch.kind == "seq2seq" else 0)
    assert {(s["num_heads"], s["num_kv_heads"], s["head_dim"]) for s in sites} == \
        {(want["heads"], want["kv_heads"], want["head_dim"])}
    assert sorted({s["layer"] for s in self_attention}) == list(range(want["layers"]))
    skipped, mlp = report.analysis["skipped"], report.analysis["mlp_sites"]
    if "mlp" in arch.limits:  # MoE: the experts of every layer, left as they are with the reason
        experts = [s for s in skipped if s["kind"] == "experts"]
        assert len(experts) == want["layers"] and all(arch.limits["mlp"] in s["reason"] for s in experts), experts
    else:
        assert len(mlp) == want["layers"] * stacks
        assert {s["intermediate_size"] for s in mlp} == {want["mlp_width"]}
    assert all(s["expected"] for s in skipped), skipped


@pytest.mark.parametrize("criterion", list(DATA_FREE))
@architectures()
def test_data_free_pruning_on_every_architecture(name, criterion, compiled):
    arch, want = ARCHITECTURES[name], expected(compiled(name)[0].config)
    zero, real = ({"prune": {"method": criterion, **params}} for params in DATA_FREE[criterion])
    got, dense = _run(compiled, name, zero)[:2]
    torch.testing.assert_close(got, dense, atol=0, rtol=0)
    got, _, report, graph, example_inputs = _run(compiled, name, real)
    assert torch.isfinite(got).all()
    [result] = report.passes
    if criterion == "nm":  # 2:4: half of every projection's weights, exactly
        assert result["params"]["after"] * 2 == result["params"]["before"] > 0
        return
    pruned = compile_sparse.analyze(graph, example_inputs)
    if "mlp" not in arch.limits:
        assert [s.intermediate_size for s in pruned.mlp] == [want["mlp_width"] // 2] * len(pruned.mlp) != []
    else:
        assert any(arch.limits["mlp"] in reason for reason in result["refused"].values())
    if "heads" in arch.limits:
        assert all(arch.limits["heads"] in result["refused"][s.name] for s in pruned.attention)
    else:
        assert {s.num_heads for s in pruned.attention} == {want["heads"] // 2}


def _cache_lengths(cache):
    return [layer.keys.shape[-2] for layer in cache.layers]


def _config(method):
    params = {key: value for key, value in kv_options(method, 0.5).items() if key != "method"}
    return config_class("kv", method)(**params)


def _slots(method, layers, length, compressed):
    """The cache length each compressed layer holds after the prefill of ``length`` tokens: its
    budget, or for per-layer budgets (pyramidkv) the largest, which every layer's slots share
    behind one mask."""
    budgets = [_config(method).budget(layer, layers, length) for layer in range(layers)]
    shared = max(budgets) if len(set(budgets)) > 1 else None
    return {layer: shared or budgets[layer] for layer in compressed}


def _generate(model, name, **extra):
    with torch.no_grad():
        return model.generate(**inputs(name), **extra, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                              pad_token_id=0, output_logits=True, return_dict_in_generate=True)


def _grows(method):
    """Tokens a cache grows by over 7 decode steps: 0 with decode eviction, else 7."""
    config = _config(method)
    return 0 if config.SUPPORTS_DECODE and config.decode else 7


def _check_decoder(name, method, compiled, **params):
    """generate() on the cache the model builds: ratio 0 equals dense; at 0.5 every full-attention
    layer keeps its budget (sliding-window layers are refused with the reason). The generated cache."""
    model, dense, matrix = compiled(name)
    reference = _generate(dense, name)
    matrix.options = {"kv": kv_options(method, 0.0, **params)}
    same = _generate(model, name)
    assert torch.equal(same.sequences, reference.sequences)
    torch.testing.assert_close(torch.stack(same.logits), torch.stack(reference.logits), atol=1e-5, rtol=1e-4)

    matrix.options = {"kv": kv_options(method, 0.5, **params)}
    out = _generate(model, name)
    assert out.sequences.shape == (1, PROMPT + 8)
    [result] = matrix.reports_for(matrix.options)[0].passes  # the first graph generate() runs: the prefill
    sites, refused = result["sites"], result["refused"]
    lengths, dense_lengths = _cache_lengths(out.past_key_values), _cache_lengths(reference.past_key_values)
    compressed = [layer for layer in range(len(lengths)) if f"layer {layer} attention" not in refused]
    for layer in set(range(len(lengths))) - set(compressed):  # sliding-window layers (warned about): HF's rule
        assert "sliding-window" in refused[f"layer {layer} attention"], refused
        assert lengths[layer] == dense_lengths[layer] < PROMPT + 7
    slots = _slots(method, len(lengths), PROMPT, compressed)
    for layer in compressed:
        assert sites[f"layer {layer} attention"].startswith("prefill eviction"), sites
        assert lengths[layer] == slots[layer] + _grows(method), (layer, lengths, sites)
    if method != "pyramidkv" and compressed:
        assert set(slots.values()) == {PROMPT // 2}
    return out.past_key_values, compressed


@kv_pairs("decoder")
def test_kv_methods_on_every_decoder(name, method, compiled):
    _check_decoder(name, method, compiled)


@pytest.mark.parametrize("name,method", [pytest.param(name, ("h2o", "snapkv")[i % 2], marks=pytest.mark.xdist_group(name))
                                         for i, name in enumerate(by_kind("decoder"))])
def test_per_head_budgets_on_every_decoder(name, method, compiled):
    """Per-head budgets (a packed cache; a method with a decode rule and one without, taking turns
    over the architectures): the same as every method, and each compressed layer's slots are owned
    by its KV heads, all of them real (the bytes of the uniform cache)."""
    cache, compressed = _check_decoder(name, method, compiled, head_budgets="adaptive")
    for layer in compressed:
        keys = cache.layers[layer].keys  # (1, Hkv, K, D)
        state = STATE.store.get(keys).flatten(1, 2)  # (1, Hkv * K, C)
        assert (state[..., POSITION] >= 0).all()
        assert sorted(state[0, :, OWNER].long().unique().tolist()) == list(range(keys.shape[1]))


@kv_pairs("seq2seq")
def test_kv_methods_on_every_encoder_decoder(name, method, compiled):
    """The decoder's self-attention cache of a 16-token decoder prompt keeps the budget; the
    cross-attention cache (the encoder's keys) is left as it is."""
    model, dense, matrix = compiled(name)
    prompt = torch.arange(3, 19).unsqueeze(0)
    matrix.options = {"kv": kv_options(method, 0.5)}
    out, reference = _generate(model, name, decoder_input_ids=prompt), _generate(dense, name, decoder_input_ids=prompt)
    cache, full = out.past_key_values, reference.past_key_values
    [result] = matrix.reports_for(matrix.options)[0].passes  # the first graph generate() runs: the prefill
    layers = len(cache.self_attention_cache.layers)
    prompt_length = reference.sequences.shape[1] - 8  # generate may prepend a start token
    slots = _slots(method, layers, prompt_length, range(layers))
    for layer, (mine, theirs) in enumerate(zip(cache.self_attention_cache.layers, full.self_attention_cache.layers)):
        assert "cache (the encoder's keys and values) is left as it is" in result["sites"][f"layer {layer} cross-attention"]
        assert result["sites"][f"layer {layer} attention"].startswith("prefill eviction"), result["sites"]
        assert mine.keys.shape[-2] == slots[layer] + _grows(method), (layer, mine.keys.shape, result["sites"])
        assert theirs.keys.shape[-2] == prompt_length + 7 > slots[layer]
    assert _cache_lengths(cache.cross_attention_cache) == _cache_lengths(full.cross_attention_cache)


@pytest.mark.parametrize("method", TOKEN_METHODS)
@architectures("encoder", "seq2seq")
def test_encoder_token_methods_on_every_encoder(name, method, compiled):
    """On an encoder, or the encoder of an encoder-decoder model: keep ratio 1 is the dense model,
    0.75 after layer 1 leaves exactly that share of the tokens in the output."""
    model, _, matrix = compiled(name)
    if ARCHITECTURES[name].kind == "seq2seq":
        encoder = torch.compile(model.get_encoder(), backend=matrix)
        dense_encoder = compiled(name)[1].get_encoder()
    else:
        encoder, dense_encoder = model, compiled(name)[1]
    kwargs = inputs(name)
    zero, real = ({"tokens": {"method": method, "layers": [1], "keep_ratios": [keep]}} for keep in (1.0, 0.75))
    with torch.no_grad():
        dense = _output(dense_encoder(**kwargs))
        matrix.options = zero
        torch.testing.assert_close(_output(encoder(**kwargs)), dense, atol=1e-5, rtol=1e-4)
        matrix.options = real
        got = _output(encoder(**kwargs))
    [result] = matrix.reports_for(real)[-1].passes
    limit = ARCHITECTURES[name].limits.get("tokens")
    if limit is not None:
        assert limit in result["refused"]["graph"] and got.shape == dense.shape
        return
    tokens, kept = dense.shape[1], round(dense.shape[1] * 0.75)
    assert result["sites"]["tokens per layer"] == f"{tokens} {kept}"
    assert got.shape == (1, kept, dense.shape[2])
