"""What the kernel tests share: devices and dtypes, fresh inputs, poisoned outputs, and the error
yardsticks (an fp32 reference; eager torch in the kernel's own dtype). The fixtures ``gen`` and
``poison_op_outputs`` live in conftest.py."""

from __future__ import annotations

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DEVICES = [DEVICE]
# On CPU the kernels run under Triton's interpreter, which emulates both half types the same way
# (numpy float32 arithmetic with casts): bf16 stands for them there; a GPU runs all three.
FLOATS = [torch.float32, torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float32, torch.bfloat16]
D = 32


def randn(*shape: int, dtype: torch.dtype, device: str, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)


def poisoned(shape, dtype: torch.dtype, device: str) -> torch.Tensor:
    """NaN for floats, 0b10101010 for integers: a kernel that skips an element leaves a value that fails."""
    return torch.full(shape, float("nan") if dtype.is_floating_point else 170, dtype=dtype, device=device)


def eager_attention(q, k, v, scale, mask=None):
    """Attention computed by plain torch in the inputs' own dtype: the error budget's yardstick."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return torch.matmul(logits.softmax(dim=-1).nan_to_num(0.0), v)


def eager_key_scores(q, k, scale, causal, q_start):
    """Per-key attention received, by plain torch in the inputs' own dtype (the yardstick for fp16 / bf16)."""
    b, hkv, kv_len, _ = k.shape
    group = q.shape[1] // hkv
    logits = torch.matmul(q[:, :, q_start:], k.repeat_interleave(group, dim=1).transpose(-1, -2)) * scale
    if causal:
        q_pos = torch.arange(q_start, q.shape[2], device=q.device) + (kv_len - q.shape[2])
        logits = logits.masked_fill(torch.arange(kv_len, device=q.device)[None, :] > q_pos[:, None], float("-inf"))
    return logits.softmax(dim=-1).nan_to_num(0.0).reshape(b, hkv, -1, kv_len).sum(dim=2)


def assert_close(out: torch.Tensor, ref32: torch.Tensor, eager: torch.Tensor | None = None) -> None:
    """fp32: within 1e-4 of the fp32 reference. fp16 / bf16: at most 2x as far from it as eager
    torch in that dtype (plus one rounding step, for outputs eager happens to round exactly)."""
    assert not out.isnan().any(), "the kernel left poisoned (NaN) outputs"
    error = (out.float() - ref32.float()).abs().max().item() if out.numel() else 0.0
    if out.dtype == torch.float32:
        assert error <= 1e-4 * max(1.0, ref32.abs().max().item()), error
    else:
        eager_error = (eager.float() - ref32.float()).abs().max().item()
        ulp = torch.finfo(out.dtype).eps * ref32.abs().max().item()
        assert error <= 2 * eager_error + ulp, (error, eager_error)


def interpret(device: str) -> bool:
    return device == "cpu"
