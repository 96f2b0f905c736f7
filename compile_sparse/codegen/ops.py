"""The sparse attention kernels as ``torch.library`` custom ops, with fake (shape) implementations
and a torch reference for each.

Every op runs its Triton kernel on CUDA tensors, or on CPU tensors under Triton's interpreter when
called with ``interpret=True`` (for tests and debugging); otherwise it runs the torch reference.
The backend calls the references directly on CPU, so that Inductor compiles them.

Shapes: B batch, Hq query heads, Hkv KV heads (GROUP = Hq / Hkv), D head dim, T / L tokens.
- ``decode_attention(q (B, Hq, 1, D), k, v (B, Hkv, L, D))`` -> (B, Hq, 1, D)
- ``varlen_decode_attention(q, k, v (N, D) packed, offsets, lengths (B * Hkv,))`` -> (B, Hq, 1, D)
- ``bitmap_compress(x (B, Hkv, L, D), sparsity)`` -> bits (B, Hkv, L, D / 8) uint8, values (B, Hkv, L, kept)
- ``bitmap_decode_attention(q, k_bits, k_values, v_bits, v_values)`` -> (B, Hq, 1, D)
- ``prefill_attention(q (B, Hq, Tq, D), k, v (B, Hkv, Tk, D), index (B, Hkv, K) or empty)`` ->
  out (B, Hq, Tq, D), lse (B, Hq, Tq) fp32
- ``attention_key_scores(q, k, q_start)`` -> (B, Hkv, Tk) fp32
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..reference import causal_visibility, gqa_group, grouped_logits, grouped_probs
from .render import load

_TL_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
             torch.int64: "i64", torch.uint8: "u8"}


@dataclass
class Launch:
    """One kernel launch: what the op runs, and what the PTX check compiles."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        names = self.kernel.arg_names
        if len(names) != len(self.args):
            raise TypeError(f"{self.kernel.__name__} takes {len(names)} arguments, got {len(self.args)}")

    @property
    def signature(self) -> dict[str, str]:
        """Triton types of the arguments, for ``triton.compile`` (only the build check needs them)."""
        return {name: _triton_type(arg) for name, arg in zip(self.kernel.arg_names, self.args)}

    def run(self) -> None:
        if 0 in self.grid:
            return
        self.kernel[self.grid](*self.args, num_warps=self.num_warps, num_stages=self.num_stages)


def _triton_type(arg: Any) -> str:
    if isinstance(arg, Tensor):
        return "*" + _TL_TYPES[arg.dtype]
    if isinstance(arg, bool) or not isinstance(arg, (int, float)):
        raise TypeError(f"kernel arguments are tensors, ints or floats, got {arg!r}")
    return "fp32" if isinstance(arg, float) else ("i64" if abs(arg) >= 2**31 else "i32")


def _pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, n - 1).bit_length())


def _math(dtype: torch.dtype, interpret: bool) -> dict[str, Any]:
    """Compute-dtype specialisations: the interpreter gets bf16 / fp16 math wrong, so it upcasts;
    fp32 inputs use IEEE dot products (not TF32) on the GPU."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"attention kernels take fp32, fp16 or bf16 tensors, got {dtype}")
    return dict(UPCAST=int(interpret or dtype == torch.float32),
                DOT_PRECISION="ieee" if dtype == torch.float32 or interpret else "tf32")


def _check_head_dim(d: int) -> None:
    if d < 16 or d & (d - 1):
        raise ValueError(f"head dim must be a power of two >= 16, got {d}")


def _run(launches: list[Launch]) -> None:
    for launch in launches:
        launch.run()


def _unit_last(t: Tensor) -> Tensor:
    """``t`` with a unit stride on its last axis, which every kernel assumes (copied if needed)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def output(like: Tensor, shape, dtype: torch.dtype | None = None) -> Tensor:
    """A new tensor a kernel writes in full (uninitialized: tests poison it, see tests/test_kernels.py)."""
    return like.new_empty(shape, dtype=dtype if dtype is not None else like.dtype)


def _check_unit_last(**tensors: Tensor) -> None:
    bad = [name for name, t in tensors.items() if t.numel() and t.stride(-1) != 1]
    if bad:
        raise ValueError(f"{', '.join(bad)} must have a unit stride on the last axis")


# ---------------------------------------------------------------------------------------------
# decode attention: compacted, per-head variable length, bitmap-sparse
# ---------------------------------------------------------------------------------------------


def _num_splits(q: Tensor, units: int, typical: int, block_n: int, requested: int) -> int:
    """Splits per KV head: ``requested``, or enough programs to fill the GPU, at most one per
    block_n tokens of a ``typical`` head. Each head divides its own length into that many splits
    inside the kernel, so no length is read back to the host."""
    if requested <= 0:
        programs = 4 * torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
        requested = math.ceil(programs / units)
    return max(1, min(requested, math.ceil(typical / block_n)))


# (BLOCK_N, num_warps) of the decode kernel on the GPU (bench/gpu_kernels.py --sweep times the bitmap layout)
DECODE_CONFIG = (64, 4)


def decode_launches(q: Tensor, k: Tensor, v: Tensor, out: Tensor, *, scale: float, interpret: bool,
                    num_splits: int = 0, offsets: Tensor | None = None, lengths: Tensor | None = None,
                    k_bits: Tensor | None = None, v_bits: Tensor | None = None,
                    config: tuple[int, int] | None = None) -> list[Launch]:
    """The split kernel and the combine kernel for one decode step.

    Dense: k, v (B, Hkv, L, D). Varlen: k, v (N, D), offsets / lengths (B * Hkv,) int32. Bitmap:
    k, v are the packed values (B, Hkv, L, kept), k_bits / v_bits (B, Hkv, L, D / 8). ``config``
    overrides DECODE_CONFIG.
    """
    _check_unit_last(q=q, k=k, v=v, out=out)
    b, hq, one, d = q.shape
    if one != 1:
        raise ValueError(f"decode attention takes one query token, got q of shape {tuple(q.shape)}")
    _check_head_dim(d)
    varlen, bitmap = offsets is not None, k_bits is not None
    if varlen:
        hkv = offsets.shape[0] // b
        length, typical = 0, k.shape[0] // (b * hkv)
        k_strides, v_strides = (0, 0, k.stride(0)), (0, 0, v.stride(0))
    else:
        hkv, length = k.shape[1], k.shape[2]
        typical = length
        k_strides, v_strides = (k.stride(0), k.stride(1), k.stride(2)), (v.stride(0), v.stride(1), v.stride(2))
    group = gqa_group(q, hkv)
    block_n, warps = (16, 4) if interpret else config or DECODE_CONFIG
    splits = _num_splits(q, b * hkv, typical, block_n, num_splits)
    part_out = output(q, (b, hkv, splits, group, d), torch.float32)
    part_lse = output(q, (b, hkv, splits, group), torch.float32)
    dummy = q.new_empty(0, dtype=torch.int32)
    spec = dict(HEAD_DIM=d, GROUP=group, BLOCK_G=_pow2(group, 16), BLOCK_N=block_n, BLOCK_S=_pow2(splits),
                VARLEN=int(varlen), BITMAP=int(bitmap), K_KEPT=k.shape[-1] if bitmap else d,
                V_KEPT=v.shape[-1] if bitmap else d, **_math(q.dtype, interpret))
    module = load("decode_attention", interpret, **spec)
    partial = Launch(module.decode_partial, (b * hkv, splits),
                     (q, k, v, k_bits if bitmap else dummy, v_bits if bitmap else dummy,
                      offsets if varlen else dummy, lengths if varlen else dummy, part_out, part_lse,
                      hkv, length, splits, float(scale), q.stride(0), q.stride(1), *k_strides, *v_strides),
                     num_warps=warps, num_stages=3)
    merge = Launch(module.combine, (b * hq,), (part_out, part_lse, out, splits, hq, out.stride(0), out.stride(1)))
    return [partial, merge]


def _grouped_probs(q: Tensor, k: Tensor, scale: float, mask: Tensor | None = None) -> Tensor:
    """fp32 attention probabilities (B, Hq, T, L) of q against k (the shared reference); ``mask``
    (T, L) or (B, Hkv, T, L) is True where visible; a row with no visible key is 0."""
    return grouped_probs(q, k, scale, mask).flatten(1, 2)


def decode_attention_reference(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """q (B, Hq, 1, D), k / v (B, Hkv, L, D) -> (B, Hq, 1, D) in q's dtype; an empty cache gives 0."""
    probs = _grouped_probs(q, k, scale)  # (B, Hq, 1, L)
    v = v.float().repeat_interleave(q.shape[1] // v.shape[1], dim=1)  # (B, Hq, L, D)
    return torch.matmul(probs, v).to(q.dtype)


@torch.library.custom_op("compile_sparse::decode_attention", mutates_args=())
def decode_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, interpret: bool = False,
                     num_splits: int = 0) -> Tensor:
    """Attention of one new token over a compacted cache, GQA-aware, split along the cache."""
    if not (q.is_cuda or interpret):
        return decode_attention_reference(q, k, v, scale)
    out = output(q, q.shape)  # contiguous
    _run(decode_launches(_unit_last(q), _unit_last(k), _unit_last(v), out, scale=scale, interpret=interpret,
                         num_splits=num_splits))
    return out


@decode_attention.register_fake
def _(q, k, v, scale, interpret=False, num_splits=0):
    return torch.empty_like(q)


def varlen_decode_attention_reference(q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, lengths: Tensor,
                                      scale: float) -> Tensor:
    """q (B, Hq, 1, D); k, v (N, D) with head (b, h)'s tokens at rows offsets[b * Hkv + h] onwards,
    lengths[b * Hkv + h] of them -> (B, Hq, 1, D)."""
    b, hq, _, d = q.shape
    hkv = offsets.shape[0] // b
    group = gqa_group(q, hkv)
    out = torch.zeros_like(q)
    for bh, (first, count) in enumerate(zip(offsets.tolist(), lengths.tolist())):
        heads = slice(bh % hkv * group, (bh % hkv + 1) * group)
        rows = slice(first, first + count)
        out[bh // hkv, heads] = decode_attention_reference(q[bh // hkv, None, heads], k[None, None, rows],
                                                           v[None, None, rows], scale)[0]
    return out


@torch.library.custom_op("compile_sparse::varlen_decode_attention", mutates_args=())
def varlen_decode_attention(q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, lengths: Tensor, scale: float,
                            interpret: bool = False, num_splits: int = 0) -> Tensor:
    """Decode attention over a packed cache in which every KV head keeps its own number of tokens."""
    if offsets.shape != lengths.shape or offsets.shape[0] % q.shape[0]:
        raise ValueError(f"offsets {tuple(offsets.shape)} and lengths {tuple(lengths.shape)} must both be "
                         f"(B * Hkv,) with B = {q.shape[0]}")
    if not (q.is_cuda or interpret):
        return varlen_decode_attention_reference(q, k, v, offsets, lengths, scale)
    out = output(q, q.shape)  # contiguous
    _run(decode_launches(_unit_last(q), _unit_last(k), _unit_last(v), out, scale=scale, interpret=interpret,
                         num_splits=num_splits, offsets=offsets.int(), lengths=lengths.int()))
    return out


@varlen_decode_attention.register_fake
def _(q, k, v, offsets, lengths, scale, interpret=False, num_splits=0):
    return torch.empty_like(q)


# ---------------------------------------------------------------------------------------------
# bitmap-sparse KV (Mustafar)
# ---------------------------------------------------------------------------------------------


def kept_elements(head_dim: int, sparsity: float) -> int:
    """Elements each token keeps at ``sparsity`` (the fraction removed)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return max(1, round(head_dim * (1.0 - sparsity)))


def bitmap_compress_reference(x: Tensor, sparsity: float) -> tuple[Tensor, Tensor]:
    """x (..., D) -> bits (..., D / 8) uint8, values (..., kept): the kept largest-|x| elements per token,
    ties broken towards lower indices, in element order."""
    d = x.shape[-1]
    kept = kept_elements(d, sparsity)
    size = x.float().abs()
    threshold = size.sort(dim=-1, descending=True).values[..., kept - 1: kept]  # (..., 1)
    above, tie = size > threshold, size == threshold
    need = kept - above.sum(dim=-1, keepdim=True)
    keep = above | (tie & (tie.int().cumsum(dim=-1) <= need))  # (..., D), exactly `kept` per token
    values = x[keep].reshape(*x.shape[:-1], kept)  # boolean indexing keeps element order
    weights = 2 ** torch.arange(8, device=x.device, dtype=torch.int32)
    bits = (keep.reshape(*x.shape[:-1], d // 8, 8).int() * weights).sum(dim=-1).to(torch.uint8)  # (..., D / 8)
    return bits, values


def bitmap_decompress(bits: Tensor, values: Tensor) -> Tensor:
    """Inverse of the compression: (..., D / 8), (..., kept) -> (..., D) with zeros where pruned."""
    shifts = torch.arange(8, device=bits.device, dtype=torch.int32)
    keep = ((bits.int().unsqueeze(-1) >> shifts) & 1).bool().flatten(-2)  # (..., D)
    dense = values.new_zeros(keep.shape)
    dense[keep] = values.flatten()
    return dense


def compress_launch(x: Tensor, bits: Tensor, values: Tensor, *, interpret: bool) -> Launch:
    """x (..., D) contiguous into bits (..., D / 8) and values (..., kept)."""
    d, kept = x.shape[-1], values.shape[-1]
    rows = x.numel() // d
    block_r = 16 if interpret else 32
    module = load("bitmap_compress", interpret, HEAD_DIM=d, KEPT=kept, BLOCK_R=block_r)
    return Launch(module.compress, (math.ceil(rows / block_r),), (x, bits, values, rows), num_warps=4)


@torch.library.custom_op("compile_sparse::bitmap_compress", mutates_args=())
def bitmap_compress(x: Tensor, sparsity: float, interpret: bool = False) -> tuple[Tensor, Tensor]:
    """Per-token magnitude pruning of x (..., D) into a bitmap and packed values."""
    d = x.shape[-1]
    if d < 8 or d & (d - 1):
        raise ValueError(f"the last dim must be a power of two >= 8, got {d}")
    if not (x.is_cuda or interpret):
        return bitmap_compress_reference(x, sparsity)
    bits = output(x, (*x.shape[:-1], d // 8), torch.uint8)
    values = output(x, (*x.shape[:-1], kept_elements(d, sparsity)))
    compress_launch(x.contiguous(), bits, values, interpret=interpret).run()
    return bits, values


@bitmap_compress.register_fake
def _(x, sparsity, interpret=False):
    kept = kept_elements(x.shape[-1], sparsity)
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 8), dtype=torch.uint8), x.new_empty((*x.shape[:-1], kept))


@torch.library.custom_op("compile_sparse::bitmap_decode_attention", mutates_args=())
def bitmap_decode_attention(q: Tensor, k_bits: Tensor, k_values: Tensor, v_bits: Tensor, v_values: Tensor,
                            scale: float, interpret: bool = False, num_splits: int = 0) -> Tensor:
    """Decode attention that reads bitmap-compressed K and V (B, Hkv, L, ...) directly."""
    if not (q.is_cuda or interpret):
        k, v = bitmap_decompress(k_bits, k_values), bitmap_decompress(v_bits, v_values)
        return decode_attention_reference(q, k, v, scale)
    for name, t in (("k_bits", k_bits), ("k_values", k_values), ("v_bits", v_bits), ("v_values", v_values)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (as bitmap_compress writes it)")
    out = output(q, q.shape)  # contiguous
    _run(decode_launches(_unit_last(q), k_values, v_values, out, scale=scale, interpret=interpret,
                         num_splits=num_splits, k_bits=k_bits, v_bits=v_bits))
    return out


@bitmap_decode_attention.register_fake
def _(q, k_bits, k_values, v_bits, v_values, scale, interpret=False, num_splits=0):
    return torch.empty_like(q)


# ---------------------------------------------------------------------------------------------
# prefill attention with log-sum-exp, gathered-token attention, per-key scores
# ---------------------------------------------------------------------------------------------


def _visibility(q_len: int, kv_len: int, causal: bool, index: Tensor | None, device: torch.device) -> Tensor | None:
    """True where query i (at kv_len - q_len + i) may see key j: (Tq, Tk), or (B, Hkv, Tq, K) gathered."""
    if index is None:
        return causal_visibility(q_len, kv_len, device) if causal else None
    q_pos = torch.arange(q_len, device=device) + (kv_len - q_len)  # (Tq,)
    if not causal:
        return torch.ones((*index.shape[:2], q_len, index.shape[2]), dtype=torch.bool, device=device)
    return index[:, :, None, :] <= q_pos[:, None]  # (B, Hkv, Tq, K)


def prefill_attention_reference(q: Tensor, k: Tensor, v: Tensor, index: Tensor | None, scale: float,
                                causal: bool) -> tuple[Tensor, Tensor]:
    """out (B, Hq, Tq, D) in q's dtype and the fp32 log-sum-exp (B, Hq, Tq) (-inf for a row that
    sees no key); with ``index`` (B, Hkv, K) the keys are k / v's tokens at those positions."""
    kv_len = k.shape[2]
    mask = _visibility(q.shape[2], kv_len, causal, index, q.device)
    if index is not None:
        gather = index[..., None].expand(-1, -1, -1, k.shape[-1])  # (B, Hkv, K, D)
        k, v = k.gather(2, gather), v.gather(2, gather)
    logits = grouped_logits(q, k, scale, mask).flatten(1, 2)  # (B, Hq, Tq, K)
    lse = logits.logsumexp(dim=-1)  # (B, Hq, Tq)
    probs = (logits - lse[..., None]).exp().nan_to_num(0.0)
    out = torch.matmul(probs, v.float().repeat_interleave(q.shape[1] // v.shape[1], dim=1))
    return out.to(q.dtype), lse


# (BLOCK_M, BLOCK_N, num_warps, num_stages) of the prefill kernel on the GPU (bench/gpu_kernels.py --sweep)
PREFILL_CONFIG = (128, 128, 8, 2)


def prefill_launch(q: Tensor, k: Tensor, v: Tensor, index: Tensor | None, out: Tensor, lse: Tensor, *,
                   scale: float, causal: bool, interpret: bool,
                   config: tuple[int, int, int, int] = PREFILL_CONFIG) -> Launch:
    _check_unit_last(q=q, k=k, v=v, out=out)
    if not lse.is_contiguous():
        raise ValueError("lse must be contiguous (B, Hq, Tq)")
    b, hq, q_len, d = q.shape
    _check_head_dim(d)
    group = gqa_group(q, k.shape[1])
    gather = index is not None
    kv_len = index.shape[2] if gather else k.shape[2]
    block_m, block_n, warps, stages = (16, 16, 4, 1) if interpret else config
    module = load("prefill_attention", interpret, HEAD_DIM=d, GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n,
                  CAUSAL=int(causal), GATHER=int(gather), **_math(q.dtype, interpret))
    index_arg = index if gather else q.new_empty(0, dtype=torch.int64)
    index_strides = (index.stride(0), index.stride(1)) if gather else (0, 0)
    return Launch(module.prefill, (math.ceil(q_len / block_m), b * hq),
                  (q, k, v, index_arg, out, lse, q_len, kv_len, k.shape[2] - q_len, hq, float(scale),
                   *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *index_strides, *out.stride()[:3]),
                  num_warps=warps, num_stages=stages)


def _check_index(index: Tensor, k: Tensor) -> None:
    if index.dim() != 3 or index.shape[:2] != k.shape[:2]:
        raise ValueError(f"index must be (B, Hkv, K) = ({k.shape[0]}, {k.shape[1]}, K), got {tuple(index.shape)}")
    if index.dtype != torch.int64:
        raise TypeError(f"index must be int64, got {index.dtype}")


@torch.library.custom_op("compile_sparse::prefill_attention", mutates_args=())
def prefill_attention(q: Tensor, k: Tensor, v: Tensor, index: Tensor | None, scale: float, causal: bool,
                      interpret: bool = False) -> tuple[Tensor, Tensor]:
    """Attention of q (B, Hq, Tq, D) over k / v (B, Hkv, Tk, D), or over only their tokens at the
    positions ``index`` (B, Hkv, K) when given (any order). Returns out and the fp32 log-sum-exp."""
    if index is not None:
        _check_index(index, k)
    if not (q.is_cuda or interpret):
        return prefill_attention_reference(q, k, v, index, scale, causal)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    out = output(q, q.shape)
    lse = output(q, q.shape[:3], torch.float32)
    prefill_launch(q, k, v, index, out, lse, scale=scale, causal=causal, interpret=interpret).run()
    return out, lse


@prefill_attention.register_fake
def _(q, k, v, index, scale, causal, interpret=False):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def key_scores_reference(q: Tensor, k: Tensor, scale: float, causal: bool, q_start: int) -> Tensor:
    """Softmax probability each key gets from queries [q_start, Tq), summed over them and over the
    query heads of its group: (B, Hkv, Tk) fp32."""
    b, hkv, kv_len, _ = k.shape
    q_len = q.shape[2]
    mask = _visibility(q_len, kv_len, causal, None, q.device)
    probs = _grouped_probs(q[:, :, q_start:], k, scale, None if mask is None else mask[q_start:])  # (B, Hq, w, Tk)
    return probs.reshape(b, hkv, -1, kv_len).sum(dim=2)  # (B, Hkv, Tk)


# (BLOCK_M, BLOCK_N, num_warps) of the key-score kernel on the GPU (bench/gpu_kernels.py --sweep)
KEY_SCORES_CONFIG = (32, 128, 4)


def key_scores_launch(q: Tensor, k: Tensor, lse: Tensor, out: Tensor, *, scale: float, causal: bool, q_start: int,
                      interpret: bool, config: tuple[int, int, int] = KEY_SCORES_CONFIG) -> Launch:
    _check_unit_last(q=q, k=k)
    if not (lse.is_contiguous() and out.is_contiguous()):
        raise ValueError("lse (B, Hq, Tq) and out (B, Hkv, Tk) must be contiguous")
    b, hkv, kv_len, d = k.shape
    block_m, block_n, warps = (16, 16, 4) if interpret else config
    module = load("key_scores", interpret, HEAD_DIM=d, GROUP=gqa_group(q, hkv), BLOCK_M=block_m, BLOCK_N=block_n,
                  CAUSAL=int(causal), **_math(q.dtype, interpret))
    return Launch(module.key_scores, (math.ceil(kv_len / block_n), b * hkv),
                  (q, k, lse, out, q.shape[2], kv_len, q_start, hkv, float(scale), *q.stride()[:3], *k.stride()[:3]),
                  num_warps=warps, num_stages=2)


@torch.library.custom_op("compile_sparse::attention_key_scores", mutates_args=())
def attention_key_scores(q: Tensor, k: Tensor, scale: float, causal: bool, q_start: int,
                         interpret: bool = False) -> Tensor:
    """Per-key attention received from queries [q_start, Tq) (B, Hkv, Tk), computed as the log-sum-exp
    of those rows (the prefill kernel) followed by the column sums (no Tq x Tk matrix)."""
    if not 0 <= q_start < q.shape[2]:
        raise ValueError(f"q_start must be in [0, {q.shape[2]}), got {q_start}")
    if not (q.is_cuda or interpret):
        return key_scores_reference(q, k, scale, causal, q_start)
    window, k = _unit_last(q[:, :, q_start:]), _unit_last(k)  # (B, Hq, w, D)
    b, hq, w, d = window.shape
    lse = output(q, (b, hq, w), torch.float32)
    out = output(q, k.shape[:3], torch.float32)
    # the rows' log-sum-exp needs values only for the (unused) output: pass k as v
    prefill_launch(window, k, k, None, torch.empty_like(window), lse, scale=scale, causal=causal,
                   interpret=interpret).run()
    key_scores_launch(window, k, lse, out, scale=scale, causal=causal, q_start=0, interpret=interpret).run()
    return out


@attention_key_scores.register_fake
def _(q, k, scale, causal, q_start, interpret=False):
    return q.new_empty(k.shape[:3], dtype=torch.float32)
