"""Token dropping and merging: the token-axis trace, identity at keep ratio 1.0, exact structure
(cache lengths, kept tokens against a reference from the dense model's attention, token counts per
layer), merging arithmetic, Inductor, generate(), and clear refusals."""

import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import compile_sparse
from compile_sparse import models
from compile_sparse.analysis import token_axes
from compile_sparse.analysis.ops import op_name
from compile_sparse.backend import sparse_backend, transform_graph
from compile_sparse.options import parse_options
from compile_sparse.methods.evit import EViTConfig
from compile_sparse.methods.lazyllm import LazyLLMConfig
from compile_sparse.methods.tome import ToMeConfig


T = 40


def ids(length=T, batch=1, seed=0):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def capture(fn, **kwargs):
    """The Dynamo graph of ``fn(**kwargs)`` and its example inputs."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    torch.compiler.reset()
    with torch.no_grad():
        torch.compile(fn, backend=backend)(**kwargs)
    return graphs[0]


def transformed(fn, tokens, **kwargs):
    """(dense graph, rewritten graph, example inputs, the tokens pass's result)."""
    gm, inputs = capture(fn, **kwargs)
    new, report = transform_graph(gm, inputs, parse_options({"tokens": tokens, "lowering": "eager"}))
    return gm, new, inputs, report.passes[0]


def lazy(layers, keeps, window=4):
    return {"method": "lazyllm", "layers": layers, "keep_ratios": keeps, "window": window, "kernel_size": 1}


# ---------------------------------------------------------------------------------------------
# Config validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config, bad", [
    (dict(layers=[0], keep_ratios=[0.5]), "0"),
    (dict(layers=[3, 2], keep_ratios=[0.5, 0.4]), "[3, 2]"),
    (dict(layers=[2, 3], keep_ratios=[0.4, 0.5]), "[0.4, 0.5]"),
    (dict(layers=[2], keep_ratios=[0.0]), "0.0"),
    (dict(layers=[2], keep_ratios=[1.5]), "1.5"),
    (dict(layers=[2], keep_ratios=[0.5, 0.4]), "[0.5, 0.4]"),
    (dict(layers=2, keep_ratios=[0.5]), "layers=2"),
    (dict(layers=[2], keep_ratios=[0.5], window=0), "0"),
])
def test_bad_schedules_are_refused_with_the_value(config, bad):
    with pytest.raises(ValueError, match=bad.replace("[", r"\[").replace("]", r"\]")):
        LazyLLMConfig(**config)


def test_bad_encoder_flags_are_refused():
    with pytest.raises(ValueError, match="'yes'"):
        EViTConfig(fuse="yes")
    with pytest.raises(ValueError, match="1"):
        ToMeConfig(proportional_attention=1)


def test_schedule_past_the_model_is_an_error():
    model = models.tiny_llama(layers=2)
    options = {"tokens": lazy([2], [0.5]), "lowering": "eager"}
    with pytest.raises(Exception, match="reach past the model's 2 layers"):
        with torch.no_grad():
            torch.compile(model, backend=functools.partial(sparse_backend, options=options))(
                input_ids=ids(), use_cache=True, logits_to_keep=1)


# ---------------------------------------------------------------------------------------------
# The token-axis trace
# ---------------------------------------------------------------------------------------------


def _by_op(gm, name, index=0):
    """The ``index``-th node calling ``name`` (found by what it does, not by Dynamo's node names)."""
    return [n for n in gm.graph.nodes if op_name(n) == name][index]


def test_token_axes_follow_llama_rope_tables_and_heads():
    model = models.tiny_llama()
    gm, inputs = capture(model, input_ids=ids(), use_cache=True, logits_to_keep=1)
    axes = token_axes(gm, T)
    assert all(a is not None for a in axes.axes.values())
    assert axes.axes[_by_op(gm, "embedding")] == (1,)  # (B, T, D)
    assert axes.axes[_by_op(gm, "cos")] == (1,)  # RoPE table (B, T, head_dim)
    for site in compile_sparse.analyze(gm, inputs).attention:
        assert axes.axes[site.query] == (2,)  # (B, H, T, D) after view and transpose
    assert axes.axes[_by_op(gm, "mean")] == (1,)  # RMSNorm's mean over features keeps the token axis
    [(node, (axis, index))] = axes.selections.items()  # logits_to_keep=1: hidden[:, -1:]
    assert (axis, index) == (1, slice(-1, None))
    head = compile_sparse.analysis.as_linear(next(iter(node.users)))  # the LM head reads the kept slice
    assert head is not None and head.out_features == model.config.vocab_size
    assert axes.reductions == {}


def test_token_axes_of_masks_and_vit_tokens():
    gm, _ = capture(models.tiny_bert(), input_ids=ids(), attention_mask=torch.ones(1, T, dtype=torch.long))
    axes = token_axes(gm, T)
    masks = [n for n in gm.graph.nodes if (compile_sparse.analysis.example_value(n) is not None
                                           and getattr(compile_sparse.analysis.example_value(n), "shape", None)
                                           == (1, 1, T, T))]
    assert masks and all(axes.axes[m] == (2, 3) for m in masks)  # (B, 1, T, T) masks: queries and keys
    position_slices = [n for n in gm.graph.nodes if op_name(n) == "getitem" and "position" in str(n.args[0])]
    assert [axes.axes[n] for n in position_slices] == [(1,)]  # a position buffer sliced to the sequence
    gm, _ = capture(models.tiny_vit(), pixel_values=torch.randn(1, 3, 32, 32))
    axes = token_axes(gm, 17)  # 16 patches and [CLS]: made a sequence by the concatenation
    sequence = _by_op(gm, "cat")
    assert axes.axes[sequence] == (1,)
    assert all(axes.axes[n] == () for n in sequence.args[0])  # (B, 16, D) patches: not yet the sequence
    [(axis, index)] = axes.selections.values()  # the pooler reads [CLS]
    assert (axis, index) == (1, 0)


def test_an_op_the_trace_does_not_know_leaves_tokens_untraced():
    def fn(x):
        return torch.roll(x, 1, dims=1) + x

    gm, _ = capture(fn, x=torch.randn(1, T, 8))
    axes = token_axes(gm, T)
    roll = next(n for n in gm.graph.nodes if "roll" in n.name)
    assert axes.axes[roll] is None
    assert axes.axes[next(iter(roll.users))] is None


# ---------------------------------------------------------------------------------------------
# LazyLLM (decoders)
# ---------------------------------------------------------------------------------------------


def test_lazyllm_keep_one_is_exactly_dense_and_counts_its_rewrites():
    model = models.tiny_llama(layers=4)
    dense, new, inputs, result = transformed(model, lazy([1, 2], [1.0, 1.0]), input_ids=ids(), use_cache=True,
                                             logits_to_keep=1)
    with torch.no_grad():
        for a, b in zip(new(*inputs), dense(*inputs)):
            assert torch.equal(a, b)
    # cut 1: the residual stream, cos and sin; cut 2: the residual stream, and cos and sin again through
    # both cuts (two calls each)
    assert result["rewrites"] == {"cuts": 2, "reduced tensors": 8, "resized views": 0}
    assert result["sites"]["tokens per layer"] == "40 40 40 40"


def _lazyllm_reference(model, input_ids, layer, kept, window):
    """The tokens LazyLLM keeps at a cut before ``layer``: from the dense eager model's attention
    in layer - 1, summed over heads and the last ``window`` queries; the window always kept."""
    eager = models.tiny_llama(layers=4, attn_implementation="eager")
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        attentions = eager(input_ids=input_ids, output_attentions=True).attentions
    scores = attentions[layer - 1][0, :, -window:].sum(dim=(0, 1))  # (T,)
    scores[-window:] = float("inf")
    return scores.topk(kept).indices.sort().values


def test_lazyllm_keeps_the_most_attended_tokens_and_caches_only_them():
    model = models.tiny_llama(layers=4)
    input_ids = ids()
    options = {"tokens": lazy([2], [0.5]), "lowering": "eager"}
    compiled = torch.compile(model, backend=functools.partial(sparse_backend, options=options))
    with torch.no_grad():
        out = compiled(input_ids=input_ids, use_cache=True, logits_to_keep=1)
        dense = model(input_ids=input_ids, use_cache=True)
    cache = out.past_key_values
    assert [layer.keys.shape[2] for layer in cache.layers] == [40, 40, 20, 20]
    expected = _lazyllm_reference(model, input_ids, 2, 20, 4)
    assert expected[-4:].tolist() == [36, 37, 38, 39]
    # layers before the cut are dense; layer 2's keys and values are the dense ones of the kept tokens
    # (its input, the output of layer 1, is computed over every token)
    for i in (0, 1):
        torch.testing.assert_close(cache.layers[i].keys, dense.past_key_values.layers[i].keys)
    torch.testing.assert_close(cache.layers[2].keys, dense.past_key_values.layers[2].keys[:, :, expected])
    torch.testing.assert_close(cache.layers[2].values, dense.past_key_values.layers[2].values[:, :, expected])
    assert not torch.allclose(out.logits[:, -1], dense.logits[:, -1])


def test_lazyllm_through_inductor_equals_eager_lowering():
    model = models.tiny_llama(layers=4)
    results = []
    for lowering in ("eager", "inductor"):
        options = {"tokens": lazy([1, 3], [0.6, 0.3]), "lowering": lowering}
        torch.compiler.reset()
        compiled = torch.compile(model, backend=functools.partial(sparse_backend, options=options))
        with torch.no_grad():
            results.append(compiled(input_ids=ids(), use_cache=True, logits_to_keep=1))
    assert [layer.keys.shape[2] for layer in results[1].past_key_values.layers] == [40, 24, 24, 12]
    torch.testing.assert_close(results[0].logits, results[1].logits, atol=1e-5, rtol=1e-5)


def test_lazyllm_generate_prefills_short_caches_and_decodes_over_them():
    model = models.tiny_llama(layers=4)
    input_ids = ids(length=24)
    options = {"tokens": lazy([2], [0.5])}
    forward = model.forward
    model.forward = torch.compile(forward, backend=functools.partial(sparse_backend, options=options))
    try:
        with torch.no_grad():
            out = model.generate(input_ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
                                 return_dict_in_generate=True)
    finally:
        model.forward = forward
    # 24 prompt tokens, 12 from layer 2 on; four tokens generated (the last one is not cached)
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == [27, 27, 15, 15]
    # the reference: the same prefill, then plain eager decode steps over its short caches
    torch.compiler.reset()
    prefill = torch.compile(forward, backend=functools.partial(sparse_backend, options={**options, "lowering": "eager"}))
    with torch.no_grad():
        step = prefill(input_ids=input_ids, use_cache=True, logits_to_keep=1)
        cache, tokens = step.past_key_values, []
        for position in range(24, 28):
            tokens.append(step.logits[:, -1].argmax(-1, keepdim=True))
            step = model(input_ids=tokens[-1], past_key_values=cache, position_ids=torch.tensor([[position]]))
    assert torch.equal(out.sequences[:, 24:], torch.cat(tokens, dim=1))


def test_lazyllm_on_a_handwritten_decoder_with_a_sliced_causal_buffer():
    class LastLogits(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, idx):
            return self.inner(idx)[:, -1:]  # (B, 1, vocab)

    model = LastLogits(models.nanogpt(layers=3))
    dense, new, inputs, result = transformed(model, lazy([1], [1.0]), idx=ids(length=32))
    with torch.no_grad():
        assert torch.equal(new(*inputs)[0], dense(*inputs)[0])
    # the block masks bias[:, :, :T, :T] are reduced on both token axes
    assert result["rewrites"]["cuts"] == 1 and result["rewrites"]["reduced tensors"] == 3
    _, new, inputs, result = transformed(model, lazy([1], [0.5]), idx=ids(length=32))
    assert result["sites"]["tokens per layer"] == "32 16 16"
    with torch.no_grad():
        assert new(*inputs)[0].shape == (1, 1, 128)


@pytest.mark.parametrize("case, reason", [
    ("full_logits", "returns logits with one value per token"),
    ("batch", "batch of 2 sequences"),
    ("decode", "not to a decode step"),
    ("encoder", "not causal"),
    ("untraced", "does not follow"),
])
def test_lazyllm_refuses_with_the_reason(case, reason):
    llama = models.tiny_llama(layers=3)
    if case == "full_logits":
        fn, kwargs = llama, dict(input_ids=ids(), use_cache=True)
    elif case == "batch":
        fn, kwargs = llama, dict(input_ids=ids(batch=2), use_cache=True, logits_to_keep=1)
    elif case == "decode":
        with torch.no_grad():
            cache = llama(input_ids=ids(), use_cache=True).past_key_values
        fn, kwargs = llama, dict(input_ids=ids(length=1), past_key_values=cache, use_cache=True)
    elif case == "encoder":
        fn, kwargs = models.tiny_bert(), dict(input_ids=ids(), attention_mask=torch.ones(1, T, dtype=torch.long))
    else:
        inner = models.nanogpt(layers=3)

        def fn(idx):
            x = inner.wte(idx) + inner.wpe(torch.arange(idx.shape[1]))
            for i, block in enumerate(inner.blocks):
                x = block(torch.roll(x, 1, dims=1) if i == 2 else x)
            return F.linear(inner.ln_f(x), inner.wte.weight)[:, -1]

        kwargs = dict(idx=ids(length=32))
    dense, new, inputs, result = transformed(fn, lazy([1], [0.5]), **kwargs)
    assert result["rewrites"] == {}
    assert reason in result["sites"]["graph"] and result["sites"]["graph"].startswith("not applied")
    assert len(new.graph.nodes) == len(dense.graph.nodes)


def test_lazyllm_on_gpt2_conv1d_and_learned_positions():
    """GPT-2: Conv1D projections (addmm on 2-D rows) and learned position embeddings."""
    model = models.tiny_gpt2(layers=3)
    dense, new, inputs, result = transformed(model, lazy([1], [1.0]), input_ids=ids(length=30), use_cache=True,
                                             logits_to_keep=1)
    with torch.no_grad():
        for a, b in zip(new(*inputs), dense(*inputs)):
            assert torch.equal(a, b)
    _, new, inputs, result = transformed(model, lazy([1], [0.5]), input_ids=ids(length=30), use_cache=True,
                                         logits_to_keep=1)
    assert result["sites"]["tokens per layer"] == "30 15 15"
