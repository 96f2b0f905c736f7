"""Token merging and dropping in encoders (EViT, ToMe on BERT / ViT / MiniLM): identity at keep
ratio 1, exact token counts per layer, what each selector keeps, size-weighted pooling, refusals."""

import functools

import pytest
import torch
import torch.nn.functional as F

from compile_sparse import eval as ev
from compile_sparse import models
from compile_sparse._torch_internals import compile_per_shape
from compile_sparse.backend import sparse_backend
from compile_sparse.methods.evit import EViTConfig
from compile_sparse.methods.tome import ToMeConfig
from compile_sparse.passes.tokens.schedule import per_layer
from compile_sparse.passes.tokens.select import CutInputs, reduce_tokens, weight_tokens

from .test_tokens import ids, transformed

# ---------------------------------------------------------------------------------------------
# EViT and ToMe (encoders)
# ---------------------------------------------------------------------------------------------

ENCODERS = {
    "bert": (lambda: models.tiny_bert(layers=4), lambda: dict(input_ids=ids(length=24),
                                                              attention_mask=torch.ones(1, 24, dtype=torch.long)), 24),
    "vit": (lambda: models.tiny_vit(layers=4), lambda: dict(pixel_values=torch.randn(1, 3, 32, 32)), 17),
}


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("method", ["evit", "tome"])
def test_encoder_keep_one_is_exactly_dense(encoder, method):
    build, inputs, _ = ENCODERS[encoder]
    dense, new, example, result = transformed(build(), {"method": method, "layers": [1, 2], "keep_ratios": [1.0, 1.0]},
                                              **inputs())
    with torch.no_grad():
        for a, b in zip(new(*example), dense(*example)):
            assert torch.equal(a, b)
    assert result["rewrites"]["cuts"] == 2


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("method", ["evit", "tome"])
def test_encoder_token_counts_per_layer_are_exact(encoder, method):
    build, inputs, length = ENCODERS[encoder]
    tokens = {"method": method, "layers": [1, 3], "keep_ratios": [0.75, 0.5]}
    _, new, example, result = transformed(build(), tokens, **inputs())
    first, second = round(length * 0.75), round(length * 0.5)
    assert result["sites"]["tokens per layer"] == f"{length} {first} {first} {second}"
    with torch.no_grad():
        hidden, pooled = new(*example)[:2]
    assert hidden.shape == (1, second, 64) and pooled.shape == (1, 64)  # last_hidden_state; pooler on [CLS]
    # every layer's attention runs over exactly its scheduled tokens
    shapes = [tuple(n.meta["val"].shape) for n in new.graph.nodes if "scaled_dot_product_attention" in str(n.target)]
    assert [s[2] for s in shapes] == [length, first, first, second]
    assert result["rewrites"].get("proportional attention", 0) == (3 if method == "tome" else 0)


def test_evit_keeps_cls_and_the_most_attended_tokens_and_fuses_the_rest():
    key = torch.randn(1, 2, 10, 8)
    query = torch.randn(1, 2, 10, 8)
    inputs = CutInputs(query, key, None, None, torch.ones(10), 8 ** -0.5, False)
    index, merge, sizes = EViTConfig().select(inputs, 5)
    attention = ((query[:, :, :1] @ key.transpose(-1, -2)) * 8 ** -0.5).softmax(-1).mean(dim=(0, 1))[0]  # (10,)
    ranked = attention.clone()
    ranked[0] = float("inf")
    top = ranked.argsort(descending=True)[:4].sort().values
    assert index[:4].tolist() == top.tolist() and index[0] == 0
    rest = [i for i in range(10) if i not in top.tolist()]
    torch.testing.assert_close(merge[4, rest], attention[rest] / attention[rest].sum())
    assert sizes.tolist() == [1, 1, 1, 1, 6]
    torch.testing.assert_close(merge.sum(dim=-1), torch.ones(5))


def test_tome_merges_the_most_similar_pairs_and_never_cls():
    key = torch.randn(1, 2, 12, 8)
    key[:, :, 4] = key[:, :, 5] * 2  # token 4 (set A) points where token 5 (set B) does: merged first
    key[:, :, 0] = key[:, :, 1]  # [CLS] matches token 1 exactly, yet is never merged
    inputs = CutInputs(torch.randn(1, 2, 12, 8), key, None, None, torch.ones(12), 1.0, False)
    index, merge, sizes = ToMeConfig().select(inputs, 11)
    assert index.tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11]
    assert sizes.tolist() == [1, 1, 1, 1, 2, 1, 1, 1, 1, 1, 1]
    torch.testing.assert_close(merge[4, 4:6], torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="at most 5 of 12"):
        ToMeConfig().select(inputs, 6)


def test_size_weighted_mean_of_merged_tokens_is_the_mean_of_the_originals():
    features = torch.randn(1, 12, 6)
    inputs = CutInputs(torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8), None, None, torch.ones(12), 1.0, False)
    index, merge, sizes = ToMeConfig().select(inputs, 8)
    merged = reduce_tokens(features, index, merge, (1,))  # (1, 8, 6)
    torch.testing.assert_close(weight_tokens(merged, sizes, 1, mean=True).mean(dim=1), features.mean(dim=1))
    torch.testing.assert_close(weight_tokens(merged, sizes, 1, mean=False).sum(dim=1), features.sum(dim=1))
    assert not torch.allclose(merged.mean(dim=1), features.mean(dim=1))


def test_mean_pooling_in_the_graph_is_size_weighted():
    model = models.tiny_bert(layers=3)
    embed = ev.mean_pooled(model)
    kwargs = dict(input_ids=ids(length=24), attention_mask=torch.ones(1, 24, dtype=torch.long))
    dense, new, inputs, result = transformed(embed, {"method": "tome", "layers": [1, 2], "keep_ratios": [1.0, 1.0]},
                                             **kwargs)
    with torch.no_grad():
        assert torch.equal(new(*inputs)[0], dense(*inputs)[0])
    assert result["rewrites"]["size-weighted reductions"] == 1  # the pooled sum; the mask's count stays dense
    _, new, inputs, result = transformed(embed, {"method": "tome", "layers": [1, 2], "keep_ratios": [0.7, 0.5]},
                                         **kwargs)
    with torch.no_grad():
        cosine = F.cosine_similarity(new(*inputs)[0], dense(*inputs)[0]).item()
    assert result["rewrites"]["size-weighted reductions"] == 1 and 0 < cosine < 1


@pytest.mark.parametrize("method", ["evit", "tome"])
def test_encoder_methods_refuse_decoders(method):
    _, _, _, result = transformed(models.tiny_llama(layers=3), {"method": method, "layers": [1], "keep_ratios": [0.5]},
                                  input_ids=ids(), use_cache=True, logits_to_keep=1)
    assert "not bidirectional" in result["sites"]["graph"]


@pytest.mark.slow
def test_minilm_tome_on_sotu_sentences():
    """The MiniLM protocol on the first 8 sentences of the most recent SotU speech: ToMe with the last
    layer on 30% fewer tokens stays close to dense (over all 457 sentences, bench/token_minilm.py
    measures 0.982); ToMe from layer 4 beats truncating the sentences at the same compute."""
    model, tokenizer = models.load("minilm")
    sentences = ev.sentences(models.sotu_documents("test", 1)[0][1], tokenizer)[:8]
    embed = ev.mean_pooled(model)
    with torch.no_grad():
        dense = [embed(s, torch.ones_like(s)) for s in sentences]
    results = {}
    for layers, keeps in (([5], [0.7]), ([4, 5], [0.85, 0.7])):
        fraction = sum(per_layer(layers, keeps, 1.0, 6)) / 6
        options = {"tokens": {"method": "tome", "layers": layers, "keep_ratios": keeps}, "lowering": "eager"}
        torch.compiler.reset()
        compiled = compile_per_shape(embed, functools.partial(sparse_backend, options=options))
        tome = ev.minilm_cosine("tome", compiled, dense, sentences, fraction)
        truncate = ev.minilm_cosine("truncate", ev.truncated_sentences(embed, fraction), dense, sentences, fraction)
        results[len(layers)] = (tome, truncate)
        assert max(tome.cosines) < 1  # tokens really were merged
    assert results[1][0].mean_cosine >= 0.975
    assert results[2][0].mean_cosine > results[2][1].mean_cosine
