"""Build every generated kernel for a GPU without one: ``python -m compile_sparse.codegen.build_check``.

Compiles the launch of each op (at the GPU benchmark's head sizes, bf16 and fp32) to PTX and a cubin
for an H100 (sm_90) with ``triton.compile``; needs no driver, so CI on a CPU machine catches a kernel
that would not build on the GPU. Run it in a process where TRITON_INTERPRET is unset: once triton is
imported under the interpreter its own library functions (``tl.sort``...) cannot be compiled.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from . import ops


def launches() -> list[tuple[str, ops.Launch]]:
    """(name, launch) of every kernel the ops launch, built as JIT functions and never run."""
    found = []
    for dtype in (torch.bfloat16, torch.float32):
        q = torch.randn(2, 32, 1, 128, dtype=dtype)
        k = torch.randn(2, 8, 300, 128, dtype=dtype)  # (B, Hkv, L, D)
        out = torch.empty_like(q)
        lengths = torch.tensor([300, 5] * 8, dtype=torch.int32)
        offsets = torch.cumsum(lengths, 0, dtype=torch.int32) - lengths
        bits, values = ops.bitmap_compress_reference(k, 0.7)
        prefill_q = torch.randn(2, 32, 300, 128, dtype=dtype)
        index = torch.arange(0, 300, 3).expand(2, 8, -1)  # (B, Hkv, K)
        lse = torch.empty(prefill_q.shape[:3])
        named = [
            ("decode", ops.decode_launches(q, k, k, out, scale=0.1, interpret=False, num_splits=4)),
            ("varlen decode", ops.decode_launches(q, k.flatten(0, 2), k.flatten(0, 2), out, scale=0.1, interpret=False,
                                                  num_splits=4, offsets=offsets, lengths=lengths)),
            ("bitmap decode", ops.decode_launches(q, values, values, out, scale=0.1, interpret=False, num_splits=4,
                                                  k_bits=bits, v_bits=bits)),
            ("bitmap compress", [ops.compress_launch(k, bits, values, interpret=False)]),
            ("prefill", [ops.prefill_launch(prefill_q, k, k, None, prefill_q, lse, scale=0.1, causal=True,
                                            interpret=False)]),
            ("gathered prefill", [ops.prefill_launch(prefill_q, k, k, index, prefill_q, lse, scale=0.1, causal=True,
                                                     interpret=False)]),
            ("key scores", [ops.key_scores_launch(prefill_q, k, lse, lse, scale=0.1, causal=True, q_start=0,
                                                  interpret=False)]),
        ]
        dtype_name = str(dtype).removeprefix("torch.")
        found += [(f"{name} {launch.kernel.__name__} {dtype_name}", launch) for name, group in named for launch in group]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability (90: H100)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: GPU code cannot be generated under the interpreter")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failed = 0
    for name, launch in launches():
        try:
            compiled = triton.compile(ASTSource(launch.kernel, launch.signature), target=GPUTarget("cuda", args.arch, 32),
                                      options=dict(num_warps=launch.num_warps, num_stages=launch.num_stages))
            assert f".target sm_{args.arch}" in compiled.asm["ptx"] and compiled.asm["cubin"]
            print(f"ok      {name}: {len(compiled.asm['cubin'])} bytes of sm_{args.arch} code", flush=True)
        except Exception as error:  # report every kernel, then fail
            failed += 1
            print(f"FAILED  {name}: {type(error).__name__}: {error}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
