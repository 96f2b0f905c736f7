"""Prefill attention with log-sum-exp, attention over gathered tokens and per-key scores: the Triton
kernels against their fp32 torch references (under Triton's interpreter on a machine without CUDA;
see test_kernels.py for the conventions: fresh inputs, poisoned outputs, eager error as yardstick)."""

from __future__ import annotations

import pytest
import torch

from compile_sparse.codegen import ops

from .kernel_helpers import (D, DEVICE, DEVICES, FLOATS, assert_close, eager_attention, eager_key_scores, interpret,
                             poisoned, randn)

pytestmark = pytest.mark.usefixtures("poison_op_outputs")


# ---------------------------------------------------------------------------------------------
# prefill attention with log-sum-exp, attention over gathered tokens, per-key scores
# ---------------------------------------------------------------------------------------------


def causal_mask(q_len: int, kv_len: int) -> torch.Tensor:
    return torch.arange(kv_len)[None, :] <= torch.arange(q_len)[:, None] + (kv_len - q_len)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("group, q_len, kv_len, causal", [(1, 23, 23, True), (3, 9, 40, True), (4, 17, 17, False),
                                                          (2, 1, 33, False)])
def test_prefill_attention(device, dtype, group, q_len, kv_len, causal, gen):
    b, hkv = 2, 2
    q = randn(b, hkv * group, q_len, D, dtype=dtype, device=device, generator=gen)
    k, v = (randn(b, hkv, kv_len, D, dtype=dtype, device=device, generator=gen) for _ in range(2))
    out, lse = poisoned(q.shape, dtype, device), poisoned(q.shape[:3], torch.float32, device)
    ops.prefill_launch(q, k, v, None, out, lse, scale=D**-0.5, causal=causal, interpret=interpret(device)).run()
    ref, ref_lse = ops.prefill_attention_reference(q.float(), k.float(), v.float(), None, D**-0.5, causal)
    mask = causal_mask(q_len, kv_len).to(device) if causal else None
    assert_close(out, ref, eager_attention(q, k, v, D**-0.5, mask))
    assert (lse - ref_lse).abs().max().item() <= 1e-4 * ref_lse.abs().max().item() + 1e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("group, kept, causal", [(1, 13, True), (3, 40, True), (4, 7, False), (2, 1, True)])
def test_gathered_attention(device, dtype, group, kept, causal, gen):
    """Attention over the tokens at ``index`` (any order) of the full K / V equals attention over the gathered copy."""
    b, hkv, q_len, kv_len = 2, 2, 11, 40
    q = randn(b, hkv * group, q_len, D, dtype=dtype, device=device, generator=gen)
    k, v = (randn(b, hkv, kv_len, D, dtype=dtype, device=device, generator=gen) for _ in range(2))
    index = torch.stack([torch.randperm(kv_len, generator=gen)[:kept] for _ in range(b * hkv)])
    index = index.view(b, hkv, kept).to(device)  # (B, Hkv, K), in random order
    out, lse = poisoned(q.shape, dtype, device), poisoned(q.shape[:3], torch.float32, device)
    ops.prefill_launch(q, k, v, index, out, lse, scale=D**-0.5, causal=causal, interpret=interpret(device)).run()
    ref, ref_lse = ops.prefill_attention_reference(q.float(), k.float(), v.float(), index, D**-0.5, causal)
    gather = index[..., None].expand(-1, -1, -1, D)
    mask = ops._visibility(q_len, kv_len, causal, index, index.device)
    eager = eager_attention(q, k.gather(2, gather), v.gather(2, gather), D**-0.5,
                            None if mask is None else mask.repeat_interleave(group, dim=1))
    assert_close(out, ref, eager)
    seen = ref_lse.isfinite()
    assert torch.equal(lse.isfinite(), seen), "rows that see no kept token have lse -inf"
    assert (lse[seen] - ref_lse[seen]).abs().max().item() <= 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("group, q_len, kv_len, q_start, causal", [(1, 30, 30, 0, True), (3, 25, 41, 17, True),
                                                                    (4, 12, 12, 11, False), (2, 8, 35, 0, True)])
def test_attention_key_scores(device, dtype, group, q_len, kv_len, q_start, causal, gen):
    b, hkv = 2, 2
    q = randn(b, hkv * group, q_len, D, dtype=dtype, device=device, generator=gen)
    k = randn(b, hkv, kv_len, D, dtype=dtype, device=device, generator=gen)
    scores = ops.attention_key_scores(q, k, D**-0.5, causal, q_start, interpret=interpret(device))
    ref = ops.key_scores_reference(q.float(), k.float(), D**-0.5, causal, q_start)
    assert_close(scores, ref, eager_key_scores(q, k, D**-0.5, causal, q_start))
    queries = group * (q_len - q_start)
    assert torch.allclose(scores.sum(dim=(1, 2)), torch.full((b,), float(hkv * queries), device=device), rtol=1e-3), \
        "each query row's probabilities sum to 1"


def test_key_scores_launch_writes_every_key(gen):
    """The column-sum kernel alone, from the prefill kernel's lse, into a poisoned output."""
    q = randn(1, 4, 20, D, dtype=torch.float32, device=DEVICE, generator=gen)
    k, v = (randn(1, 2, 20, D, dtype=torch.float32, device=DEVICE, generator=gen) for _ in range(2))
    _, lse = ops.prefill_attention(q, k, v, None, 0.2, True, interpret=interpret(DEVICE))
    out = poisoned((1, 2, 20), torch.float32, DEVICE)
    ops.key_scores_launch(q, k, lse, out, scale=0.2, causal=True, q_start=5, interpret=interpret(DEVICE)).run()
    assert_close(out, ops.key_scores_reference(q, k, 0.2, True, 5))
