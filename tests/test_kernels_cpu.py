"""The native CPU kernel (codegen/cpu.py) against a plain fp32 torch reference: fresh random inputs,
outputs poisoned before the run; and the KV prefill op's routing to it."""

from __future__ import annotations

import os
import subprocess
import sysconfig

import pytest
import torch

from compile_sparse.codegen import cpu
from compile_sparse.methods.h2o import H2OConfig
from compile_sparse.methods.hitkv import HitKVConfig, top_k_hits
from compile_sparse.passes.kv import prefill

from .kernel_helpers import D, assert_close, randn

pytestmark = pytest.mark.usefixtures("poison_op_outputs")


def reference(q, k, v, valid, scale, softcap, top_k):
    """The whole probability matrix, then its product with v and its per-key totals."""
    b, hq, length, _ = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    logits = torch.matmul(q, k.repeat_interleave(group, dim=1).transpose(-1, -2)) * scale  # (B, Hq, T, T)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None, None]  # (1, 1, T, T)
    if valid is not None:
        allowed = allowed & valid[:, None, None, :] & valid[:, None, :, None]
    probs = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1).nan_to_num(0.0)  # padding rows: 0
    out = torch.matmul(probs, v.repeat_interleave(group, dim=1))
    grid = probs.view(b, hkv, group, length, length)
    totals = grid.sum(dim=(2, 3)) if top_k == 0 else top_k_hits(grid, top_k)
    return out, totals


def test_the_kernel_builds_here():
    assert cpu.available()


@pytest.mark.parametrize("isa", [*cpu.ISA_FLAGS, "DEFAULT"])
def test_the_kernel_source_compiles_for_every_vector_isa(isa):
    """The machine's ISA picks the at::vec implementation the kernel is built with, and another
    machine may pick another: the source compiles under each (AVX512's headers do not declare
    what AVX2's pulled in for it)."""
    from torch.utils import cpp_extension

    includes = [f"-I{path}" for path in [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]]
    for source in cpu.SOURCES:
        done = subprocess.run([os.environ.get("CXX", "c++"), "-std=c++20", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=check",
                               *cpu.build_flags(isa), *includes, str(source)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("group, length", [(1, 37), (3, 50), (2, 1), (4, 16)])
@pytest.mark.parametrize("top_k", [0, 1, 4, 60])
@pytest.mark.parametrize("padded", [False, True])
def test_attention_totals_matches_the_reference(group, length, top_k, padded, gen):
    b, hkv = 2, 2
    q = randn(b, hkv * group, length, D, dtype=torch.float32, device="cpu", generator=gen) * 2
    k, v = (randn(b, hkv, length, D, dtype=torch.float32, device="cpu", generator=gen) for _ in range(2))
    valid = None
    if padded:  # left padding: row 1 starts with length // 3 pads
        valid = torch.ones(b, length, dtype=torch.bool)
        valid[1, :length // 3] = False
    softcap = 5.0 if group == 3 else None
    out, totals = cpu.attention_totals(q, k, v, valid, D ** -0.5, softcap, top_k)
    want_out, want_totals = reference(q, k, v, valid, D ** -0.5, softcap, top_k)
    assert_close(out, want_out)
    if top_k:
        assert torch.equal(totals, want_totals)
    else:
        assert_close(totals, want_totals)


def test_attention_totals_refuses_bad_shapes():
    q, k = torch.randn(1, 3, 8, D), torch.randn(1, 2, 8, D)
    with pytest.raises(ValueError, match="Hkv dividing Hq"):
        cpu.attention_totals(q, k, k, None, 1.0, None, 0)
    with pytest.raises(ValueError, match="valid must be"):
        cpu.attention_totals(q[:, :2], k, k, torch.ones(1, 7, dtype=torch.bool), 1.0, None, 0)


class _Squares(H2OConfig):
    """A method whose per-query amount has no native rule."""

    def per_query(self, probs):
        return probs.square().sum(dim=(2, 3))


@pytest.mark.parametrize("config, native", [(H2OConfig(compression_ratio=0.5), 0),
                                            (HitKVConfig(compression_ratio=0.5, top_k=3), 3),
                                            (_Squares(compression_ratio=0.5), None)])
def test_the_prefill_op_runs_the_native_rule_of_the_method(config, native, monkeypatch, gen):
    """kv_attention_totals calls the kernel with the method's rule, and the torch chunks (the same
    result) for a per_query the kernel does not know."""
    assert config.native_per_query() == native
    calls = []
    kernel = cpu.attention_totals
    monkeypatch.setattr(cpu, "attention_totals", lambda *args: calls.append(args[-1]) or kernel(*args))
    monkeypatch.setattr(prefill, "config_of", lambda spec: config)
    q = randn(1, 4, 40, D, dtype=torch.float32, device="cpu", generator=gen)
    k, v = (randn(1, 2, 40, D, dtype=torch.float32, device="cpu", generator=gen) for _ in range(2))
    out, totals = prefill.attention_totals(q, k, v, None, D ** -0.5, None, "unused")
    assert calls == ([] if native is None else [native])
    want_out, want_totals = prefill.attention_totals_torch(q, k, v, None, D ** -0.5, None, config)
    assert_close(out, want_out)
    assert_close(totals, want_totals)


def test_a_failed_build_warns_and_keeps_the_torch_code(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    def fail(*args, **kwargs):
        raise RuntimeError("no compiler\nerror: g++ not found")

    monkeypatch.setenv("COMPILE_SPARSE_CACHE", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", fail)
    cpu.available.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not be built .*g\\+\\+ not found.*torch code"):
            assert not cpu.available()
    finally:
        cpu.available.cache_clear()
