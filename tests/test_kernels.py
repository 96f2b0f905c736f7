"""The Triton kernels against their fp32 torch references.

On a machine without CUDA the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set in
conftest before triton is imported), on small shapes; on a CUDA machine the same checks run the
compiled kernels on the GPU (one process cannot do both: triton's own library functions are built
for one mode when triton is imported).
Inputs are fresh random tensors per check and kernel outputs are poisoned (NaN) before the run.
One test compiles every generated kernel to PTX / cubin for sm_90, so a kernel that would not
build on an H100 fails here.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
import torch

from compile_sparse.codegen import build_check, ops, render

from .kernel_helpers import D, DEVICE, DEVICES, FLOATS, assert_close, eager_attention, interpret, poisoned, randn


pytestmark = pytest.mark.usefixtures("poison_op_outputs")


# ---------------------------------------------------------------------------------------------
# decode attention over a compacted cache
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("group, length, splits", [(1, 37, 3), (3, 50, 2), (4, 19, 0), (4, 0, 1), (2, 1, 4)])
def test_decode_attention(device, dtype, group, length, splits, gen):
    b, hkv = 2, 2
    q = randn(b, hkv * group, 1, D, dtype=dtype, device=device, generator=gen)
    k, v = (randn(b, hkv, length, D, dtype=dtype, device=device, generator=gen) for _ in range(2))
    out = poisoned(q.shape, dtype, device)
    for launch in ops.decode_launches(q, k, v, out, scale=D**-0.5, interpret=interpret(device), num_splits=splits):
        launch.run()
    ref = ops.decode_attention_reference(q.float(), k.float(), v.float(), D**-0.5)
    if length == 0:
        assert torch.equal(out, torch.zeros_like(out)), "an empty cache gives 0"
    else:
        assert_close(out, ref, eager_attention(q, k, v, D**-0.5))


@pytest.mark.parametrize("device", DEVICES)
def test_decode_attention_op_reads_strided_cache(device, gen):
    """The custom op on a cache view that is a slice of a longer buffer (the compacted cache's layout)."""
    buffer = randn(2, 2, 64, D, dtype=torch.float32, device=device, generator=gen)
    k, v = buffer[:, :, 3:40], buffer.flip(2)[:, :, :37]
    q = randn(2, 8, 1, D, dtype=torch.float32, device=device, generator=gen)
    out = ops.decode_attention(q, k, v, 0.2, interpret=interpret(device))
    assert_close(out, ops.decode_attention_reference(q, k, v, 0.2))


# ---------------------------------------------------------------------------------------------
# per-head variable-length KV
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("group", [1, 3, 4])
def test_varlen_decode_attention(device, dtype, group, gen):
    b, hkv, capacity = 2, 3, 45
    lengths = torch.randint(1, capacity + 1, (b * hkv,), generator=gen)
    lengths[0], lengths[-1] = 0, capacity  # an empty and a full budget
    offsets = torch.cumsum(lengths, 0) - lengths
    total = int(lengths.sum())
    q = randn(b, hkv * group, 1, D, dtype=dtype, device=device, generator=gen)
    k, v = (randn(total, D, dtype=dtype, device=device, generator=gen) for _ in range(2))
    out = poisoned(q.shape, dtype, device)
    for launch in ops.decode_launches(q, k, v, out, scale=D**-0.5, interpret=interpret(device), num_splits=2,
                                      offsets=offsets.int().to(device), lengths=lengths.int().to(device)):
        launch.run()
    ref = ops.varlen_decode_attention_reference(q.float(), k.float(), v.float(), offsets, lengths, D**-0.5)
    eager = torch.zeros_like(q)
    for bh, (first, count) in enumerate(zip(offsets.tolist(), lengths.tolist())):
        heads = slice(bh % hkv * group, (bh % hkv + 1) * group)
        rows = slice(first, first + count)
        eager[bh // hkv, heads] = eager_attention(q[bh // hkv, None, heads], k[None, None, rows],
                                                  v[None, None, rows], D**-0.5)[0]
    assert torch.equal(out[0, :group], torch.zeros_like(out[0, :group])), "head 0 keeps no token: output 0"
    assert_close(out, ref, eager)


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_op_matches_padded_dense(device, gen):
    """Packing each head's own tokens equals dense decode over that head's tokens alone."""
    q = randn(1, 4, 1, D, dtype=torch.float32, device=device, generator=gen)
    k, v = (randn(1, 2, 30, D, dtype=torch.float32, device=device, generator=gen) for _ in range(2))
    lengths = torch.tensor([30, 11])
    packed_k = torch.cat([k[0, 0], k[0, 1, :11]])  # (41, D)
    packed_v = torch.cat([v[0, 0], v[0, 1, :11]])
    out = ops.varlen_decode_attention(q, packed_k, packed_v, torch.tensor([0, 30]).to(device), lengths.to(device),
                                      0.2, interpret=interpret(device))
    head1 = ops.decode_attention_reference(q[:, 2:], k[:, 1:, :11], v[:, 1:, :11], 0.2)
    assert_close(out[:, 2:], head1)
    assert_close(out[:, :2], ops.decode_attention_reference(q[:, :2], k[:, :1], v[:, :1], 0.2))


def test_varlen_refuses_mismatched_offsets():
    q = torch.randn(2, 4, 1, D)
    with pytest.raises(ValueError, match="offsets"):
        ops.varlen_decode_attention(q, torch.randn(10, D), torch.randn(10, D), torch.zeros(4, dtype=torch.int32),
                                    torch.zeros(3, dtype=torch.int32), 0.1)


# ---------------------------------------------------------------------------------------------
# bitmap-sparse K / V (Mustafar)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.7, 0.95])
def test_bitmap_compress(device, dtype, sparsity, gen):
    x = randn(2, 3, 21, D, dtype=dtype, device=device, generator=gen)
    kept = ops.kept_elements(D, sparsity)
    bits = torch.full((2, 3, 21, D // 8), 0xAB, dtype=torch.uint8, device=device)
    values = poisoned((2, 3, 21, kept), dtype, device)
    ops.compress_launch(x, bits, values, interpret=interpret(device)).run()
    ref_bits, ref_values = ops.bitmap_compress_reference(x, sparsity)
    assert torch.equal(bits, ref_bits) and torch.equal(values, ref_values)
    dense = ops.bitmap_decompress(bits, values)
    assert ((dense != 0).sum(dim=-1) == kept).all(), "exactly `kept` elements per token"
    dropped_max = x.abs().masked_fill(dense != 0, 0).amax(dim=-1)
    kept_min = x.abs().masked_fill(dense == 0, float("inf")).amin(dim=-1)
    assert (dropped_max <= kept_min).all(), "every kept element is at least as large as every pruned one"


def test_bitmap_compress_breaks_ties_towards_low_indices():
    x = torch.tensor([[1.0, -2.0, 2.0, 2.0, 0.5, -2.0, 0.0, 3.0] * 2])  # (1, 16)
    bits, values = ops.bitmap_compress(x.to(DEVICE), 0.75, interpret=interpret(DEVICE))  # keeps 4 of 16
    # both 3.0s, then the first two of the six |x| = 2 ties
    assert values.tolist() == [[-2.0, 2.0, 3.0, 3.0]]
    assert ops.bitmap_decompress(bits, values).nonzero()[:, 1].tolist() == [1, 2, 7, 15]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("group, k_sparsity, v_sparsity", [(1, 0.0, 0.0), (3, 0.7, 0.5), (4, 0.5, 0.9)])
def test_bitmap_decode_attention(device, dtype, group, k_sparsity, v_sparsity, gen):
    b, hkv, length = 2, 2, 41
    q = randn(b, hkv * group, 1, D, dtype=dtype, device=device, generator=gen)
    k, v = (randn(b, hkv, length, D, dtype=dtype, device=device, generator=gen) for _ in range(2))
    k_bits, k_values = ops.bitmap_compress(k, k_sparsity, interpret=interpret(device))
    v_bits, v_values = ops.bitmap_compress(v, v_sparsity, interpret=interpret(device))
    out = poisoned(q.shape, dtype, device)
    for launch in ops.decode_launches(q, k_values, v_values, out, scale=D**-0.5, interpret=interpret(device),
                                      num_splits=3, k_bits=k_bits, v_bits=v_bits):
        launch.run()
    k_sparse, v_sparse = ops.bitmap_decompress(k_bits, k_values), ops.bitmap_decompress(v_bits, v_values)
    ref = ops.decode_attention_reference(q.float(), k_sparse.float(), v_sparse.float(), D**-0.5)
    assert_close(out, ref, eager_attention(q, k_sparse, v_sparse, D**-0.5))
    if k_sparsity == v_sparsity == 0.0:  # nothing pruned: the dense attention
        assert_close(out, ops.decode_attention_reference(q.float(), k.float(), v.float(), D**-0.5),
                     eager_attention(q, k, v, D**-0.5))


@pytest.mark.parametrize("sparsity", [1.0, -0.1])
def test_bitmap_refuses_bad_sparsity(sparsity):
    with pytest.raises(ValueError, match="sparsity"):
        ops.bitmap_compress(torch.randn(3, D), sparsity)


# ---------------------------------------------------------------------------------------------
# ops: eager reference on CPU, custom-op registration, bad input
# ---------------------------------------------------------------------------------------------


def test_ops_run_reference_on_cpu_without_interpret(monkeypatch):
    """Without ``interpret`` a CPU call never reaches Triton: loading any kernel fails the test."""
    monkeypatch.setattr(ops, "load", lambda *a, **k: pytest.fail("a CPU op loaded a Triton kernel"))
    q, k = torch.randn(1, 4, 3, D), torch.randn(1, 2, 3, D)
    ops.decode_attention(q[:, :, :1], k, k, 0.1)
    ops.prefill_attention(q, k, k, None, 0.1, True)
    ops.attention_key_scores(q, k, 0.1, True, 1)
    ops.bitmap_compress(k, 0.5)


def test_ops_compile_under_inductor_with_fake_shapes():
    """The custom ops trace with their fake implementations and run inside an Inductor graph."""
    def f(q, k, v):
        out, lse = torch.ops.compile_sparse.prefill_attention(q, k, v, None, 0.2, True)
        scores = torch.ops.compile_sparse.attention_key_scores(q, k, 0.2, True, 2)
        bits, values = torch.ops.compile_sparse.bitmap_compress(k, 0.5)
        decoded = torch.ops.compile_sparse.bitmap_decode_attention(q[:, :, -1:], bits, values, bits, values, 0.2)
        return out.sum() + lse.sum() + scores.sum() + decoded.sum()

    q, k, v = torch.randn(1, 4, 6, D), torch.randn(1, 2, 6, D), torch.randn(1, 2, 6, D)
    assert torch.allclose(torch.compile(f, backend="inductor", fullgraph=True)(q, k, v), f(q, k, v), rtol=1e-4)


@pytest.mark.parametrize("bad, match", [
    (dict(q=torch.randn(1, 3, 1, D), k=torch.randn(1, 2, 4, D)), "query heads"),
    (dict(q=torch.randn(1, 2, 1, 24), k=torch.randn(1, 2, 4, 24)), "power of two"),
    (dict(q=torch.randn(1, 2, 2, D), k=torch.randn(1, 2, 4, D)), "one query token"),
    (dict(q=torch.randn(1, 2, 1, D).int(), k=torch.randn(1, 2, 4, D).int()), "fp32, fp16 or bf16"),
])
def test_decode_refuses_bad_input(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ops.decode_attention(bad["q"], bad["k"], bad["k"], 0.1, interpret=True)


def test_gather_index_is_checked():
    q, k = torch.randn(1, 2, 3, D), torch.randn(1, 2, 8, D)
    with pytest.raises(ValueError, match="index must be"):
        ops.prefill_attention(q, k, k, torch.zeros(1, 3, 2, dtype=torch.int64), 0.1, True)
    with pytest.raises(TypeError, match="int64"):
        ops.prefill_attention(q, k, k, torch.zeros(1, 2, 2, dtype=torch.int32), 0.1, True)


# ---------------------------------------------------------------------------------------------
# code cache and renderer
# ---------------------------------------------------------------------------------------------


def test_render_writes_specialisations_and_caches_modules(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPILE_SPARSE_CACHE", str(tmp_path))
    source = render.render("bitmap_compress", HEAD_DIM=16, KEPT=5, BLOCK_R=4)
    assert "HEAD_DIM = tl.constexpr(16)" in source and "KEPT = tl.constexpr(5)" in source
    first = render.load("bitmap_compress", True, HEAD_DIM=16, KEPT=5, BLOCK_R=4)
    assert render.load("bitmap_compress", True, HEAD_DIM=16, KEPT=5, BLOCK_R=4) is first
    assert render.load("bitmap_compress", True, HEAD_DIM=16, KEPT=6, BLOCK_R=4) is not first
    files = sorted(p.name for p in (tmp_path / "kernels").glob("*.py"))
    assert len(files) == 2 and all(f.startswith("bitmap_compress_") for f in files)
    with pytest.raises(ValueError, match="unknown kernel template 'nope'"):
        render.render("nope")
    with pytest.raises(ValueError, match="upper case"):
        render.render("bitmap_compress", head_dim=16)


# ---------------------------------------------------------------------------------------------
# every generated kernel builds for an H100 (sm_90)
# ---------------------------------------------------------------------------------------------


def test_every_kernel_compiles_for_h100():
    """Runs the build check in its own process: this one imported triton under the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "compile_sparse.codegen.build_check", "--arch", "90"], env=env,
                          capture_output=True, text=True, timeout=900)
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout + done.stderr
    expected = {name for name, _ in build_check.launches()}  # 10 kernel launches, in bf16 and fp32
    built = {line.removeprefix("ok").strip().split(":")[0] for line in lines if line.startswith("ok")}
    assert len(expected) == 20 and built == expected, lines


# ---------------------------------------------------------------------------------------------
# the KV passes score with the kernels
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, params", [("snapkv", {"window_size": 8}), ("h2o", {"recent_window": 4})])
def test_kv_passes_score_with_the_key_score_kernel(method, params, monkeypatch):
    """SnapKV's and H2O's scores come from the Triton kernel (on CUDA, or under the interpreter with
    options["kernels"] = "interpret") and keep exactly the tokens the CPU torch path keeps."""
    from compile_sparse import models
    from compile_sparse.backend import sparse_backend

    calls = []
    kernel = ops.attention_key_scores

    def counted(*args, **kwargs):
        calls.append(kwargs.get("interpret"))
        return kernel(*args, **kwargs)

    monkeypatch.setattr(ops, "attention_key_scores", counted)
    model = models.tiny_llama(head_dim=16)
    input_ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    options = {"kv": {"method": method, "compression_ratio": 0.5, **params}, "lowering": "eager"}

    def prefill(model, options, input_ids):
        # the backend itself, so that the check also runs where the package is not installed (its entry point)
        compiled = torch.compile(model.forward, backend=functools.partial(sparse_backend, options=options))
        with torch.no_grad():
            return compiled(input_ids=input_ids, use_cache=True)

    reference = prefill(model, options, input_ids)
    assert calls == [], "CPU tensors with kernels='auto' score with torch code"
    if DEVICE == "cuda":
        out = prefill(model.cuda(), options, input_ids.cuda())
        interpreted = False
    else:
        torch.compiler.reset()
        out = prefill(model, {**options, "kernels": "interpret"}, input_ids)
        interpreted = True
    # once per layer, on the real tensors (the prefill op's fake implementation gives the shapes at compile time)
    assert calls == [interpreted] * 2
    for ours, theirs in zip(out.past_key_values.layers, reference.past_key_values.layers):
        assert ours.keys.shape[-2] == theirs.keys.shape[-2] == 20
        torch.testing.assert_close(ours.keys.cpu(), theirs.keys, atol=1e-5, rtol=1e-5)  # the same tokens kept
    torch.testing.assert_close(out.logits.cpu(), reference.logits, atol=1e-4, rtol=1e-4)


def test_ops_take_inputs_without_a_unit_last_stride(gen):
    """The ops copy such inputs (the kernels index the last axis with stride 1); launches refuse them."""
    q = randn(1, 4, 1, D, dtype=torch.float32, device=DEVICE, generator=gen)
    k = randn(1, 2, 9, D * 2, dtype=torch.float32, device=DEVICE, generator=gen)[..., ::2]  # stride 2
    out = ops.decode_attention(q, k, k, 0.2, interpret=interpret(DEVICE))
    assert_close(out, ops.decode_attention_reference(q, k, k, 0.2))
    with pytest.raises(ValueError, match="k, v must have a unit stride"):
        ops.decode_launches(q, k, k, torch.empty_like(q), scale=0.2, interpret=True)


def test_h2o_generate_through_inductor_with_the_kernels():
    """Decode steps (one query, growing symbolic cache) call the key-score op inside Inductor graphs
    (on CUDA, or interpreted on CPU) and generate the same tokens as the CPU torch scoring path."""
    from compile_sparse import models
    from compile_sparse.backend import sparse_backend

    input_ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(2))
    kv = {"method": "h2o", "compression_ratio": 0.5, "recent_window": 4}
    runs = [("cpu", "auto"), ("cuda", "auto") if DEVICE == "cuda" else ("cpu", "interpret")]
    sequences, logits = [], []
    for device, kernels in runs:
        torch.compiler.reset()
        model = models.tiny_llama(head_dim=16).to(device)
        backend = functools.partial(sparse_backend, options={"kv": kv, "kernels": kernels})
        model.forward = torch.compile(model.forward, backend=backend)
        with torch.no_grad():
            out = model.generate(input_ids.to(device), max_new_tokens=5, min_new_tokens=5, do_sample=False,
                                 pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        assert [layer.keys.shape[-2] for layer in out.past_key_values.layers] == [12, 12]
        sequences.append(out.sequences.cpu())
        logits.append(torch.stack(out.logits).cpu())
    assert torch.equal(sequences[0], sequences[1])
    assert_close(logits[1], logits[0])
