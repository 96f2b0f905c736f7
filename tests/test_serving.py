"""KV eviction on the paths a serving loop takes: any prompt length through one graph, the
StaticCache generate() builds or a user passes (its buffers shrink to the budget), left-padded batches,
in-place decode steps; and never a silent fallback: a warning for whatever the options ask for
that is not done, an error with "strict"."""

import json
import warnings

import pytest
import torch
import transformers as tf
from torch._dynamo.utils import counters

import compile_sparse
from compile_sparse import models
from compile_sparse.passes.kv.budgets import uniform_budget
from compile_sparse.passes.registry import build
from compile_sparse.state import STATE

from .methods import kv_options as kv, names

METHODS = names("kv", REREAD=False)  # a re-read method (kvzip) compresses in compress_context: tests/test_kvzip.py
LENGTHS = list(range(40, 40 + 12 * 13, 13))  # 12 prompt lengths, 40 .. 183


def compiled(model, options):
    forward = type(model).forward.__get__(model)
    model.forward = torch.compile(forward, backend="sparse", options=options)
    return model


def generate(model, ids, steps=8, **kwargs):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0,
                              return_dict_in_generate=True, output_logits=True, **kwargs)


def budget(method, ratio, length, layer=0, layers=2):
    params = {k: v for k, v in kv(method, ratio).items() if k != "method"}
    return build("kv", method, params).budget(layer, layers, length)


# ---------------------------------------------------------------------------------------------
# Any prompt length through one graph
# ---------------------------------------------------------------------------------------------


def recipe_budget(recipe, length):
    """The tokens a KV recipe keeps of a ``length``-token prompt."""
    return uniform_budget(length, compile_sparse.RECIPES[recipe]["kv"]["compression_ratio"])


KV_RECIPES = ["kv-balanced", "kv-retrieval"]  # the default and the other TOVA recipe (H2O is a method below)
CASES = [(m, {"kv": kv(m, 0.75)}) for m in METHODS] + [(r, {"recipe": r}) for r in KV_RECIPES]


@pytest.mark.parametrize("method, options", CASES, ids=[c[0] for c in CASES])
def test_twelve_prompt_lengths_compress_every_call_in_one_prefill_graph(method, options):
    model = models.tiny_llama(layers=2)
    forward = torch.compile(model.forward, backend="sparse", options={**options, "lowering": "eager"})
    counters.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", compile_sparse.SparseWarning)  # no fallback, nothing left undone
        for length in LENGTHS:
            ids = torch.randint(3, 100, (1, length), generator=torch.Generator().manual_seed(length))
            with torch.no_grad():
                cache = forward(input_ids=ids, use_cache=True).past_key_values
            expected = [recipe_budget(method, length) if method in KV_RECIPES else budget(method, 0.75, length, layer)
                        for layer in range(2)]
            assert [layer.keys.shape[-2] for layer in cache.layers] == expected, length
    assert counters["stats"]["unique_graphs"] == 2  # the first length static, then one symbolic graph


def test_prompt_lengths_through_inductor_use_one_symbolic_graph():
    model = models.tiny_llama(layers=1)
    forward = torch.compile(model.forward, backend="sparse", options={"kv": kv("h2o", 0.75)})
    counters.clear()
    for length in LENGTHS[:5]:
        ids = torch.randint(3, 100, (1, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            cache = forward(input_ids=ids, use_cache=True).past_key_values
        assert cache.layers[0].keys.shape[-2] == uniform_budget(length, 0.75)
    assert counters["stats"]["unique_graphs"] == 2


@pytest.mark.parametrize("method, params", [("h2o", {}), ("hitkv", {}), ("h2o", {"head_budgets": "adaptive"})],
                         ids=["h2o", "hitkv", "h2o-adaptive"])
def test_generate_through_inductor_decodes_every_prompt_length_in_one_symbolic_graph(method, params):
    """generate() through Inductor: the decode graph of a method with state becomes symbolic in the
    cache length at the second prompt length, as the prefill does (it was compiled again for every
    length, so that past Dynamo's recompile limit decode eviction stopped)."""
    model = models.tiny_llama(layers=2)
    forward = model.forward
    model.forward = torch.compile(forward, backend="sparse", options={"kv": kv(method, 0.75, **params), "strict": True})
    counters.clear()
    try:
        for length in LENGTHS[:6]:
            ids = torch.randint(3, 100, (1, length), generator=torch.Generator().manual_seed(length))
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0,
                                     return_dict_in_generate=True)
            assert [layer.keys.shape[-2] for layer in out.past_key_values.layers] == [uniform_budget(length, 0.75)] * 2
    finally:
        model.forward = forward
    assert counters["stats"]["unique_graphs"] == 4  # prefill and decode: static, then symbolic


def test_a_token_method_says_when_prompt_lengths_stop_being_compressed():
    """Token dropping needs a static prompt length: when Dynamo makes it symbolic the pass says so;
    with dynamic=False (one graph per length), past Dynamo's recompile limit a new length would run
    uncompressed: that is said too, and "strict" makes both errors."""
    options = {"tokens": {"method": "lazyllm", "layers": [1], "keep_ratios": [0.5], "window": 4}, "lowering": "eager"}
    model = models.tiny_llama(layers=2)

    def run(forward, lengths):
        with torch.no_grad():
            for length in lengths:
                forward(input_ids=torch.randint(3, 100, (1, length)), use_cache=True, logits_to_keep=1)

    STATE.warned.clear()
    with pytest.warns(compile_sparse.SparseWarning, match="the prompt length is symbolic.*dynamic=False"):
        run(torch.compile(model.forward, backend="sparse", options=options), LENGTHS[:2])
    torch.compiler.reset()
    with pytest.warns(compile_sparse.SparseWarning, match="recompile limit.*WITHOUT the compression"):
        run(torch.compile(model.forward, backend="sparse", options=options, dynamic=False), LENGTHS)
    torch.compiler.reset()
    with pytest.raises(Exception, match="[Rr]ecompile.limit"):
        run(torch.compile(model.forward, backend="sparse", options={**options, "strict": True}, dynamic=False), LENGTHS)


# ---------------------------------------------------------------------------------------------
# StaticCache
# ---------------------------------------------------------------------------------------------


def static_cache(model, length):
    return tf.StaticCache(config=model.config, max_cache_len=length)


@pytest.mark.parametrize("method", METHODS)
def test_static_caches_hold_the_budget_and_generate_what_a_dynamic_cache_generates(method, prompts=1):
    """The StaticCache generate() builds (cache_implementation="static") and one the user passes:
    their buffers shrink to the budget (plus room for the new tokens, for a method without a
    decode rule), measured in bytes, and they generate the DynamicCache's tokens. With ``prompts``
    2, each cache serves a second prompt (generate resets its own; the user's is reset by hand)."""
    ids = torch.randint(3, 100, (2, 40), generator=torch.Generator().manual_seed(0))
    options = {"kv": kv(method, 0.5), "lowering": "eager"}
    dynamic = generate(compiled(models.tiny_llama(), options), ids)
    model = compiled(models.tiny_llama(), options)
    static = [generate(model, ids, cache_implementation="static") for _ in range(prompts)]  # generate reuses its cache
    model = compiled(models.tiny_llama(), options)
    cache = static_cache(model, 48)
    passed = []
    for _ in range(prompts):
        cache.reset()  # the full buffers back (a no-op before the first prompt)
        passed.append(generate(model, ids, past_key_values=cache))
    evicts = build("kv", method, {"compression_ratio": 0.5}).decode
    widest = max(budget(method, 0.5, 40, layer) for layer in range(2))  # one mask width for every layer
    for out, room in (*((s, 7) for s in static), *((p, 8) for p in passed)):  # generate's: prompt + new tokens - 1
        assert torch.equal(out.sequences, dynamic.sequences)
        for layer, kept in enumerate(out.past_key_values.layers):
            slots = widest + (0 if evicts else room)  # room for the new tokens without a decode rule
            assert kept.keys.shape[-2] == kept.values.shape[-2] == slots
            assert kept.keys.untyped_storage().nbytes() == 2 * 2 * slots * 16 * 4  # (B, Hkv, slots, D) fp32, measured
            real = (STATE.store.get(kept.keys)[..., 0] >= 0).sum(-1)  # (B, Hkv) slots holding a token
            assert (real == budget(method, 0.5, 40, layer) + (0 if evicts else 7)).all()  # 7 steps fed back


@pytest.mark.parametrize("method", ["h2o", "snapkv"])  # with a decode rule, and without
def test_static_caches_serve_a_second_prompt(method):
    test_static_caches_hold_the_budget_and_generate_what_a_dynamic_cache_generates(method, prompts=2)


def test_a_second_prompt_into_a_static_cache_not_reset_is_a_clear_error():
    """The second prompt meets buffers shorter than itself: the analysis must still find every
    attention (the trace of a projection stops at the cache), so that the call fails with the
    reason, not with HF's index_copy_ out of range."""
    model = compiled(models.tiny_llama(), {"kv": kv("h2o", 0.5), "lowering": "eager"})
    ids = torch.randint(3, 100, (1, 40), generator=torch.Generator().manual_seed(6))
    cache = static_cache(model, 48)
    generate(model, ids, past_key_values=cache)
    with pytest.raises(ValueError, match="already holds tokens.*reset the cache"):
        generate(model, ids, past_key_values=cache)


@pytest.mark.parametrize("method, params", [("h2o", {}), ("h2o", {"head_budgets": "adaptive"}),
                                            ("snapkv", {"head_budgets": "adaptive"})], ids=["h2o", "h2o-adaptive",
                                                                                          "snapkv-adaptive"])
def test_a_static_cache_allocated_before_compile_sparse_keeps_its_length_and_says_so(method, params):
    """Buffers compile_sparse may not resize (not allocated by HF's StaticLayer since compile_sparse
    was imported): the budget is kept at their start (packed, with per-head budgets), the same
    tokens come out, and a warning says the memory is not saved."""
    ids = torch.randint(3, 100, (1, 40), generator=torch.Generator().manual_seed(5))
    options = {"kv": kv(method, 0.5, **params), "lowering": "eager"}
    dynamic = generate(compiled(models.tiny_llama(), options), ids)
    model = compiled(models.tiny_llama(), options)
    cache = static_cache(model, 48)
    cache.early_initialization(1, 2, 16, torch.float32, torch.device("cpu"))
    for layer in cache.layers:  # buffers of the user's own, as if allocated before the import
        layer.keys, layer.values = layer.keys.clone(), layer.values.clone()
    STATE.warned.discard(("static buffers",))
    with pytest.warns(compile_sparse.SparseWarning, match="budget is kept inside its full-length buffers"):
        out = generate(model, ids, past_key_values=cache)
    assert torch.equal(out.sequences, dynamic.sequences)
    assert [layer.keys.shape[-2] for layer in cache.layers] == [48, 48]
    state = STATE.store.get(cache.layers[0].keys)
    real = state[..., 0] >= 0  # (1, Hkv, 48)
    if not params:
        assert int(real.sum(-1).max()) == budget("h2o", 0.5, 40)  # the budget, at the buffers' start
    grown = 0 if method == "h2o" else out.sequences.shape[1] - 40 - 1  # a method without a decode rule keeps the new tokens
    assert int(real.sum()) == 2 * budget(method, 0.5, 40) + 2 * grown


def test_static_decode_compiles_once_and_writes_in_place():
    """32 decode steps with H2O over a StaticCache: one decode graph, the cache tensors keep their
    storage (each step writes one token into the slot it frees)."""
    model = compiled(models.tiny_llama(), {"kv": kv("h2o", 0.75), "lowering": "eager"})
    ids = torch.randint(3, 100, (1, 64), generator=torch.Generator().manual_seed(1))
    cache = static_cache(model, 96)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        keys = [layer.keys for layer in cache.layers]
        pointers = [k.data_ptr() for k in keys]
        assert [k.shape[-2] for k in keys] == [16, 16]
        counters.clear()
        token = torch.tensor([[5]])
        for step in range(32):
            model(input_ids=token, past_key_values=cache, position_ids=torch.tensor([[64 + step]]),
                  cache_position=torch.tensor([64 + step]), use_cache=True)
    assert counters["stats"]["unique_graphs"] == 1
    assert [layer.keys for layer in cache.layers] == keys and [k.data_ptr() for k in keys] == pointers
    assert [k.shape[-2] for k in keys] == [16, 16]


def test_the_rewritten_decode_graph_keeps_the_sources_cuda_graphs_need(monkeypatch):
    """AOTAutograd marks inputs static for CUDA graphs (mode="reduce-overhead": weights not copied
    at each replay, a StaticCache's buffers written in place without skipping capture) from what
    Dynamo attached to the graph it captured. The backend's rewritten copy keeps it: the parameters'
    sources, a source on every placeholder (None on the state inputs the KV pass adds), and the
    static-address mark of the cache buffers (HF marks those it allocates outside a compiled call)."""
    import compile_sparse.backend as backend

    graphs = []
    lower = backend.lower
    monkeypatch.setattr(backend, "lower", lambda gm, *args: graphs.append(gm) or lower(gm, *args))
    model = compiled(models.tiny_llama(), {"kv": kv("h2o", 0.75), "lowering": "eager"})
    cache = static_cache(model, 96)
    cache.early_initialization(1, 2, 16, torch.float32, torch.device("cpu"))  # buffers allocated outside a compile
    with torch.no_grad():
        model(input_ids=torch.randint(3, 100, (1, 64)), past_key_values=cache, use_cache=True)
        model(input_ids=torch.tensor([[5]]), past_key_values=cache, position_ids=torch.tensor([[64]]),
              cache_position=torch.tensor([64]), use_cache=True)
    decode = graphs[1]
    placeholders = decode.graph.find_nodes(op="placeholder")
    assert decode._param_name_to_source  # what AOTAutograd checks to take the graph for Dynamo's
    assert all(hasattr(node, "_dynamo_source") for node in placeholders)
    assert sum(node._dynamo_source is None for node in placeholders) == 2  # one state input per layer
    static = [node._dynamo_source.name for node in placeholders if node._dynamo_source is not None
              and node.meta.get("tensor_dict", {}).get("_dynamo_static_input_type")]
    buffers = [name.rsplit(".", 1)[-1] for name in static if "past_key_values" in name]
    assert buffers.count("keys") == buffers.count("values") == 2, static


@pytest.mark.parametrize("options", [kv("tova", 0.5), kv("h2o", 0.5, head_budgets="adaptive")],
                         ids=["tova", "h2o-packed"])
def test_the_decode_step_is_one_subgraph_that_every_layer_calls(monkeypatch, options):
    """The KV decode step (slot write, attention, rescoring; packed: into a slot the head owns) is
    one invoke_subgraph that every layer's node calls (Inductor lowers it once, not once per layer),
    for a static cache length and, after a second prompt length, a symbolic one; through Inductor it
    computes what the step called inline in every layer computes (run eagerly: the plain torch code)
    and writes the cache in place."""
    import compile_sparse.backend as backend
    from compile_sparse.passes.kv import rewrite

    graphs = []
    lower = backend.lower
    monkeypatch.setattr(backend, "lower", lambda gm, *args: graphs.append(gm) or lower(gm, *args))
    model = models.tiny_llama(layers=3)
    runs = {}
    for lowering in ("inductor", "eager"):
        torch.compiler.reset()
        graphs.clear()
        if lowering == "eager":  # the reference: the step function itself in every layer, no traced subgraph
            monkeypatch.setattr(rewrite, "call_compiled_once",
                                lambda gm, fn, args, kwargs, name: gm.graph.call_function(fn, tuple(args), kwargs))
        forward = torch.compile(model.forward, backend="sparse", options={"kv": options, "lowering": lowering})
        runs[lowering] = []
        for length in (40, 53):
            ids = torch.randint(3, 100, (1, length), generator=torch.Generator().manual_seed(length))
            with torch.no_grad():
                cache = forward(input_ids=ids, use_cache=True).past_key_values
                pointer = cache.layers[0].keys.data_ptr()
                for i in range(2):
                    step = forward(input_ids=torch.tensor([[5 + i]]), past_key_values=cache,
                                   position_ids=torch.tensor([[length + i]]), cache_position=torch.tensor([length + i]))
            assert cache.layers[0].keys.data_ptr() == pointer  # written in place
            runs[lowering].append((step.logits, [layer.keys.clone() for layer in cache.layers]))
        decodes = [gm for gm in graphs if any(n.target is torch.ops.higher_order.invoke_subgraph for n in gm.graph.nodes)]
        assert len(decodes) == (2 if lowering == "inductor" else 0)  # the first length's step (static sizes), then any length
        for gm in decodes:
            calls = [n for n in gm.graph.nodes if n.target is torch.ops.higher_order.invoke_subgraph]
            assert len(calls) == 3 and len({n.args[1] for n in calls}) == 1
    for (logits, keys), (expected_logits, expected_keys) in zip(runs["inductor"], runs["eager"]):
        torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
        for got, expected in zip(keys, expected_keys):
            torch.testing.assert_close(got, expected)


_COMPILE_AND_STEP = """
import json, sys
import torch
from torch._dynamo.utils import counters
from compile_sparse import models

model = models.tiny_llama()
ids = torch.randint(3, 100, (1, 40), generator=torch.Generator().manual_seed(2))
forward = torch.compile(model.forward, backend="sparse", options={"kv": json.loads(sys.argv[1])})
with torch.no_grad():
    out = forward(input_ids=ids, use_cache=True)
    step = forward(input_ids=torch.tensor([[5]]), past_key_values=out.past_key_values,
                   position_ids=torch.tensor([[40]]), cache_position=torch.tensor([40]))
torch.save({"logits": out.logits, "step": step.logits, "keys": [layer.keys for layer in out.past_key_values.layers],
            "counters": {k: v for k, v in counters["aot_autograd"].items() if k.startswith("autograd_cache")}},
           sys.argv[2])
"""


def test_a_later_process_loads_the_graphs_from_aotautograds_cache(tmp_path):
    """The graphs the passes rewrite (the prefill, and the decode step with its subgraph) are the same
    in every process, so a second process with the same on-disk caches loads them instead of tracing
    them through AOTAutograd and Inductor again (a user's second run), and they compute what the
    first process's did."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    runs = []
    for run in range(2):
        path = tmp_path / f"run{run}.pt"
        done = subprocess.run([sys.executable, "-c", _COMPILE_AND_STEP, json.dumps(kv("h2o", 0.5)), str(path)],
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(torch.load(path))
    assert runs[0]["counters"].get("autograd_cache_hit", 0) == 0
    assert runs[1]["counters"] == {"autograd_cache_hit": 2}  # the prefill graph and the decode graph, no bypass
    for key in ("logits", "step", "keys"):
        torch.testing.assert_close(runs[0][key], runs[1][key], rtol=0, atol=0)


def test_the_default_recipe_works_with_generates_static_cache():
    model = compiled(models.tiny_llama(), {"lowering": "eager"})
    out = generate(model, torch.randint(3, 100, (1, 96)), cache_implementation="static")
    assert out.sequences.shape[1] == 104
    keys = out.past_key_values.layers[0].keys
    assert keys.shape[-2] == uniform_budget(96, 0.5)  # HF's buffer holds the budget, not max_cache_len
    assert int((STATE.store.get(keys)[..., 0] >= 0).sum()) == uniform_budget(96, 0.5) * 2  # every slot real, both KV heads


# ---------------------------------------------------------------------------------------------
# Left-padded batches
# ---------------------------------------------------------------------------------------------


def _prefill_and_step(model, options, ids, mask):
    torch.compiler.reset()
    forward = torch.compile(model.forward, backend="sparse", options=options)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = forward(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        cache = out.past_key_values
        state = [STATE.store.get(layer.keys).clone() for layer in cache.layers]
        keys = [layer.keys.clone() for layer in cache.layers]
        step = torch.full((ids.shape[0], 1), 7)
        logits = forward(input_ids=step, attention_mask=torch.cat([mask, torch.ones_like(step)], 1),
                         position_ids=positions[:, -1:] + 1, past_key_values=cache).logits[:, -1]
    return keys, state, logits


@pytest.mark.parametrize("method", METHODS + KV_RECIPES)
def test_a_left_padded_batch_keeps_for_each_row_what_the_row_keeps_alone(method):
    model = models.tiny_llama()
    a = torch.randint(3, 100, (1, 80), generator=torch.Generator().manual_seed(2))
    b = torch.randint(3, 100, (1, 50), generator=torch.Generator().manual_seed(3))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 30, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :30] = 0
    options = {"recipe" if method in KV_RECIPES else "kv": method if method in KV_RECIPES else kv(method, 0.5),
               "lowering": "eager"}
    keys, state, logits = _prefill_and_step(model, options, ids, mask)
    for row, alone in ((0, a), (1, b)):
        alone_keys, alone_state, alone_logits = _prefill_and_step(model, options, alone, torch.ones_like(alone))
        for layer in range(2):
            kept = recipe_budget(method, alone.shape[1]) if method in KV_RECIPES else budget(method, 0.5, alone.shape[1],
                                                                                              layer)
            positions = state[layer][row, :, :, 0]  # (Hkv, slots): true positions, -1 for empty slots
            assert torch.equal(positions[:, :kept], alone_state[layer][0, :, :kept, 0])  # the same tokens, in order
            assert (positions[:, kept:] == -1).all()  # the row's padding never kept, never counted
            torch.testing.assert_close(keys[layer][row, :, :kept], alone_keys[layer][0, :, :kept])
        torch.testing.assert_close(logits[row], alone_logits[0], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Identity at ratio 0 on every path
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["static", "passed", "padded", "lengths"])
def test_ratio_zero_equals_dense_on_every_path(path):
    plain = models.tiny_llama()
    sparse = compiled(models.tiny_llama(), {"kv": kv("h2o", 0.0), "lowering": "eager"})  # the same weights
    ids = torch.randint(3, 100, (2, 66), generator=torch.Generator().manual_seed(4))
    prompts = [ids[:, :n] for n in (40, 53, 66)] if path == "lengths" else [ids[:, :40]]
    for prompt in prompts:
        def kwargs(model):
            if path == "static":
                return {"cache_implementation": "static"}
            if path == "passed":
                return {"past_key_values": static_cache(model, 48)}
            if path == "padded":
                mask = torch.ones_like(prompt)
                mask[1, :10] = 0
                return {"attention_mask": mask}
            return {}
        reference, out = generate(plain, prompt, **kwargs(plain)), generate(sparse, prompt, **kwargs(sparse))
        assert torch.equal(out.sequences, reference.sequences)
        torch.testing.assert_close(torch.stack(out.logits), torch.stack(reference.logits), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Never silent
# ---------------------------------------------------------------------------------------------


def _mistral():
    cfg = tf.MistralConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=96, sliding_window=32)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return tf.MistralForCausalLM(cfg).eval()


def test_a_layer_left_as_it_is_warns_once_and_strict_raises():
    STATE.warned.clear()
    ids = torch.randint(3, 100, (1, 40))
    with pytest.warns(compile_sparse.SparseWarning, match="kv:h2o leaves layer 0 attention, layer 1 attention as "
                                                          "they are: a sliding-window layer"):
        out = generate(compiled(_mistral(), {"kv": kv("h2o", 0.5), "lowering": "eager"}), ids, steps=3)
    assert out.sequences.shape[1] == 43
    torch.compiler.reset()
    with pytest.raises(Exception, match="sliding-window layer"):
        generate(compiled(_mistral(), {"kv": kv("h2o", 0.5), "lowering": "eager", "strict": True}), ids, steps=3)


def test_a_graph_break_warns():
    STATE.warned.clear()
    STATE.graph_breaks.clear()
    model = models.tiny_llama()

    def forward(ids):
        hidden = model.model.embed_tokens(ids)
        print("", end="")  # a graph break
        return model(inputs_embeds=hidden).logits

    with pytest.warns(compile_sparse.SparseWarning, match="Dynamo broke the graph"):
        torch.compile(forward, backend="sparse", options={"kv": kv("h2o", 0.5), "lowering": "eager"})(
            torch.randint(3, 100, (1, 8)))
