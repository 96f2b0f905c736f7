"""The ctx-continuation protocol on a tiny model: its baselines and identities."""

import math

import torch

from compile_sparse import eval as ev
from compile_sparse import models

CONTEXT = 24


def _setup():
    model = models.tiny_llama()
    gen = torch.Generator().manual_seed(5)
    docs = {f"doc{i}": torch.randint(0, 128, (1, CONTEXT + 8), generator=gen) for i in range(2)}
    return model, docs, ev.dense_ppl(model, docs, context=CONTEXT)


def test_dense_ppl_is_the_continuation_cross_entropy():
    model, docs, dense = _setup()
    ids = docs["doc0"]
    with torch.no_grad():
        logits = model(ids).logits[0, CONTEXT - 1:-1]  # (8, V): predicts tokens CONTEXT..CONTEXT+7
    expected = math.exp(torch.nn.functional.cross_entropy(logits, ids[0, CONTEXT:]).item())
    assert math.isclose(dense["doc0"], expected, rel_tol=1e-5)


def test_baselines_and_methods_at_zero_ratio_equal_dense():
    model, docs, dense = _setup()
    truncate = ev.ctx_continuation("truncate 0", ev.truncate_prefill(model, 0.0), ev.model_forward(model), docs, dense,
                                   context=CONTEXT)
    compiled = ev.compiled_forward(model, {"kv": {"method": "h2o", "compression_ratio": 0.0}, "lowering": "eager"})
    h2o = ev.ctx_continuation("h2o 0", ev.model_prefill(compiled), ev.model_forward(compiled), docs, dense,
                              context=CONTEXT)
    for result in (truncate, h2o):
        assert math.isclose(result.ppl_ratio, 1.0, rel_tol=1e-5)
        assert result.cache_tokens == [CONTEXT, CONTEXT]


def test_truncate_keeps_the_last_tokens_at_true_positions():
    model, docs, dense = _setup()
    result = ev.ctx_continuation("truncate", ev.truncate_prefill(model, 0.75), ev.model_forward(model), docs, dense,
                                 context=CONTEXT)
    assert result.cache_tokens == [6, 6]
    assert result.ppl_ratio != 1.0
    one_by_one = ev.ctx_continuation("truncate", ev.truncate_prefill(model, 0.75), ev.model_forward(model), docs,
                                     dense, context=CONTEXT, one_token_at_a_time=True)
    for doc in docs:
        assert math.isclose(one_by_one.ppl[doc], result.ppl[doc], rel_tol=1e-5)
