"""GPU kernel benchmark (docs/evaluation.md, "Speed"): each kernel beside torch SDPA and FlexAttention on the same
shapes: bf16, batch 8, 32 query / 8 KV heads, head dim 128, contexts 4k to 128k.

Times are medians of CUDA-graph replays (``triton.testing.do_bench_cudagraph``: no Python launch
overhead on either side); inputs that fit in L2 rotate through copies so every call reads memory. Bandwidth counts the bytes a kernel must read (K and V as stored: dense,
compacted, packed or bitmap-compressed) against the measured device-to-device copy bandwidth
(bytes read + written). SDPA decode is timed with ``enable_gqa=True`` and over K / V repeated to 32
heads, and the faster is reported.

    python bench/gpu_kernels.py --json docs/data/gpu_kernels.json --markdown docs/data/gpu_kernels.md

Rows are written to the JSON after each measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from compile_sparse.codegen import ops

B, HQ, HKV, D = 8, 32, 8, 128
DTYPE = torch.bfloat16
SCALE = D**-0.5
L2_FLUSH = 4 * 50 * 2**20  # bytes: 4x an H100's 50 MB L2


def bench_ms(fn, *inputs: torch.Tensor) -> float:
    """Median ms of ``fn(*inputs)``. Inputs smaller than 4x the L2 cache are rotated through
    copies, so that consecutive calls in the graph read memory, not L2."""
    import triton.testing

    size = nbytes(*inputs)
    copies = [inputs] + [tuple(t.clone() for t in inputs) for _ in range(min(63, math.ceil(L2_FLUSH / max(size, 1)) - 1))]
    calls = iter(range(1 << 62))

    def call():
        return fn(*copies[next(calls) % len(copies)])

    call()  # compile / load outside the graph
    torch.cuda.synchronize()
    return float(triton.testing.do_bench_cudagraph(call, rep=200, return_mode="median"))


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() / (bench_ms(lambda a, b: b.copy_(a), x, y) * 1e-3)


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Recorder:
    def __init__(self, json_path: Path | None, markdown_path: Path | None, meta: dict):
        self.json_path, self.markdown_path, self.meta, self.rows = json_path, markdown_path, meta, []

    def add(self, **row) -> None:
        if "bytes" in row and row.get("ms"):
            row["bandwidth_share"] = row["bytes"] / (row["ms"] * 1e-3) / self.meta["copy_bytes_per_s"]
        self.rows.append(row)
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()}
        print(json.dumps(shown), flush=True)
        if self.json_path:
            self.json_path.write_text(json.dumps({**self.meta, "rows": self.rows}, indent=1))
        if self.markdown_path:
            self.markdown_path.write_text(markdown(self.meta, self.rows))


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"Device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}; copy bandwidth "
             f"{meta['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write).", ""]
    for kind, title in (("decode", "Decode step"), ("prefill", "Prefill"), ("compress", "Bitmap compression")):
        chosen = [r for r in rows if r["kind"] == kind]
        if not chosen:
            continue
        lines += [f"**{title}** (B {B}, {HQ} q / {HKV} KV heads, d {D}, bf16)", "",
                  "| context | what | ms | vs reference | GB read | share of copy bandwidth |",
                  "|---:|---|---:|---:|---:|---:|"]
        for r in chosen:
            versus = f"{r['speedup']:.2f}x ({r['reference']})" if "speedup" in r else ""
            gb = f"{r['bytes'] / 1e9:.3f}" if "bytes" in r else ""
            share = f"{r['bandwidth_share']:.0%}" if "bandwidth_share" in r else ""
            ms = f"{r['ms']:.4f}" if r.get("ms") else r.get("error", "")
            lines.append(f"| {r['context']} | {r['what']} | {ms} | {versus} | {gb} | {share} |")
        lines.append("")
    return "\n".join(lines)


def attempt(fn, *inputs):
    """Time fn(*inputs), or return the error's first line (a baseline that fails is reported, not hidden)."""
    try:
        return bench_ms(fn, *inputs), None
    except Exception as error:  # noqa: BLE001 - recorded in the table
        torch.cuda.synchronize()
        return None, f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"


def sdpa_decode_ms(q, k, v) -> tuple[float, str]:
    """The faster of SDPA with enable_gqa and SDPA over K / V repeated to every query head."""
    gqa, _ = attempt(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=SCALE, enable_gqa=True), q, k, v)
    k_rep, v_rep = k.repeat_interleave(HQ // HKV, dim=1), v.repeat_interleave(HQ // HKV, dim=1)
    repeated, _ = attempt(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=SCALE), q, k_rep, v_rep)
    del k_rep, v_rep
    options = [(t, name) for t, name in ((gqa, "enable_gqa"), (repeated, "repeated K/V")) if t is not None]
    return min(options)


def run_decode(rec: Recorder, context: int, flex) -> None:
    q = torch.randn(B, HQ, 1, D, device="cuda", dtype=DTYPE)
    k, v = (torch.randn(B, HKV, context, D, device="cuda", dtype=DTYPE) for _ in range(2))
    dense_ms, how = sdpa_decode_ms(q, k, v)
    rec.add(kind="decode", context=context, what=f"SDPA dense ({how})", ms=dense_ms, bytes=nbytes(k, v))
    if flex is not None:
        ms, error = attempt(lambda q, k, v: flex(q, k, v, scale=SCALE, enable_gqa=True), q, k, v)
        rec.add(kind="decode", context=context, what="FlexAttention dense", ms=ms, error=error, bytes=nbytes(k, v),
                **({"speedup": dense_ms / ms, "reference": "SDPA dense"} if ms else {}))
    ms = bench_ms(lambda q, k, v: ops.decode_attention(q, k, v, SCALE), q, k, v)
    rec.add(kind="decode", context=context, what="ours, dense cache", ms=ms, bytes=nbytes(k, v),
            speedup=dense_ms / ms, reference="SDPA dense")

    budget = context // 10
    k_small, v_small = k[:, :, :budget].contiguous(), v[:, :, :budget].contiguous()
    ideal_ms, how = sdpa_decode_ms(q, k_small, v_small)
    rec.add(kind="decode", context=context, what=f"SDPA over a 10% cache ({how})", ms=ideal_ms,
            bytes=nbytes(k_small, v_small), speedup=dense_ms / ideal_ms, reference="SDPA dense")
    ms = bench_ms(lambda q, k, v: ops.decode_attention(q, k, v, SCALE), q, k_small, v_small)
    rec.add(kind="decode", context=context, what="ours, compacted 10% budget", ms=ms, bytes=nbytes(k_small, v_small),
            speedup=dense_ms / ms, reference="SDPA dense")

    generator = torch.Generator().manual_seed(context)
    lengths = (torch.rand(B * HKV, generator=generator) * 2 * budget).long().clamp(1, context)  # mean ~10%
    offsets = torch.cumsum(lengths, 0) - lengths
    total = int(lengths.sum())
    k_packed, v_packed = (torch.randn(total, D, device="cuda", dtype=DTYPE) for _ in range(2))
    offsets, lengths = offsets.int().cuda(), lengths.int().cuda()
    ms = bench_ms(lambda *a: ops.varlen_decode_attention(*a, SCALE), q, k_packed, v_packed, offsets, lengths)
    rec.add(kind="decode", context=context, what=f"ours, per-head budgets (mean {total / (B * HKV) / context:.1%})",
            ms=ms, bytes=nbytes(k_packed, v_packed), speedup=dense_ms / ms, reference="SDPA dense")
    del k_packed, v_packed, k_small, v_small

    k_bits, k_values = ops.bitmap_compress(k, 0.7)
    v_bits, v_values = ops.bitmap_compress(v, 0.7)
    ms = bench_ms(lambda *a: ops.bitmap_decode_attention(*a, SCALE), q, k_bits, k_values, v_bits, v_values)
    rec.add(kind="decode", context=context, what="ours, bitmap K/V at 70% sparsity", ms=ms,
            bytes=nbytes(k_bits, k_values, v_bits, v_values), speedup=dense_ms / ms, reference="SDPA dense")
    if context == 32768:
        ms = bench_ms(lambda k: ops.bitmap_compress(k, 0.7), k)
        rec.add(kind="compress", context=context, what="compress K to 70% sparsity", ms=ms,
                bytes=nbytes(k, k_bits, k_values))


def run_prefill(rec: Recorder, context: int, flex, window: int) -> None:
    q = torch.randn(B, HQ, context, D, device="cuda", dtype=DTYPE)
    k, v = (torch.randn(B, HKV, context, D, device="cuda", dtype=DTYPE) for _ in range(2))
    k_rep, v_rep = k.repeat_interleave(HQ // HKV, dim=1), v.repeat_interleave(HQ // HKV, dim=1)
    sdpa_ms = bench_ms(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE), q, k_rep, v_rep)
    rec.add(kind="prefill", context=context, what="SDPA causal (K/V repeated, flash)", ms=sdpa_ms)
    del k_rep, v_rep
    if flex is not None:
        from torch.nn.attention.flex_attention import create_block_mask

        mask = create_block_mask(lambda b, h, i, j: j <= i, None, None, context, context, device="cuda")
        ms, error = attempt(lambda q, k, v: flex(q, k, v, block_mask=mask, scale=SCALE, enable_gqa=True), q, k, v)
        rec.add(kind="prefill", context=context, what="FlexAttention causal", ms=ms, error=error,
                **({"speedup": sdpa_ms / ms, "reference": "SDPA"} if ms else {}))
    ms = bench_ms(lambda q, k, v: ops.prefill_attention(q, k, v, None, SCALE, True), q, k, v)
    rec.add(kind="prefill", context=context, what="ours, out + lse", ms=ms, speedup=sdpa_ms / ms, reference="SDPA")

    def fused(q, k, v, q_start):
        """The prefill's output and lse, then the per-key scores from that lse."""
        out, lse = ops.prefill_attention(q, k, v, None, SCALE, True)
        scores = lse.new_empty((B, HKV, context))
        ops.key_scores_launch(q, k, lse, scores, scale=SCALE, causal=True, q_start=q_start, interpret=False).run()
        return out, scores

    for q_start, name in ((context - window, f"window of {window} queries (SnapKV)"), (0, "all queries (H2O)")):
        ms = bench_ms(lambda q, k, v: fused(q, k, v, q_start), q, k, v)
        rec.add(kind="prefill", context=context, what=f"ours + per-key scores, {name}", ms=ms,
                speedup=sdpa_ms / ms, reference="SDPA")
    index = torch.arange(0, context, 2, device="cuda").expand(B, HKV, -1)  # every other token: 50% kept
    ms = bench_ms(lambda q, k, v, index: ops.prefill_attention(q, k, v, index, SCALE, True), q, k, v, index)
    rec.add(kind="prefill", context=context, what="ours, attention over a gathered 50% of the keys", ms=ms,
            speedup=sdpa_ms / ms, reference="SDPA")


def sweep_prefill(context: int) -> None:
    """Time the prefill kernel's block configurations at ``context`` (to choose ops.PREFILL_CONFIG)."""
    q = torch.randn(B, HQ, context, D, device="cuda", dtype=DTYPE)
    k, v = (torch.randn(B, HKV, context, D, device="cuda", dtype=DTYPE) for _ in range(2))
    out, lse = torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)
    for config in [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (128, 64, 8, 4),
                   (64, 64, 4, 3), (128, 32, 4, 3), (64, 128, 4, 3), (128, 128, 16, 3)]:
        try:
            launch = ops.prefill_launch(q, k, v, None, out, lse, scale=SCALE, causal=True, interpret=False,
                                        config=config)
            print(f"prefill {context} config {config}: {bench_ms(lambda: launch.run()):.3f} ms", flush=True)
        except Exception as error:  # noqa: BLE001 - a configuration that does not fit is reported
            print(f"prefill {context} config {config}: {type(error).__name__}", flush=True)


def sweep_key_scores(context: int, window: int) -> None:
    """Time the key-score kernel's (BLOCK_M, BLOCK_N, num_warps) for a window at ``context``."""
    q = torch.randn(B, HQ, context, D, device="cuda", dtype=DTYPE)
    k = torch.randn(B, HKV, context, D, device="cuda", dtype=DTYPE)
    _, lse = ops.prefill_attention(q, k, k, None, SCALE, True)
    scores = lse.new_empty((B, HKV, context))
    for config in [(64, 64, 4), (64, 128, 4), (64, 128, 8), (32, 128, 4), (64, 256, 8), (32, 64, 2), (16, 128, 4)]:
        launch = ops.key_scores_launch(q, k, lse, scores, scale=SCALE, causal=True, q_start=context - window,
                                       interpret=False, config=config)
        print(f"key scores {context} window {window} config {config}: {bench_ms(lambda: launch.run()):.4f} ms",
              flush=True)


def sweep_bitmap_decode(context: int) -> None:
    """Time the bitmap decode kernel's (BLOCK_N, num_warps) at ``context`` (ops.DECODE_CONFIG)."""
    q = torch.randn(B, HQ, 1, D, device="cuda", dtype=DTYPE)
    k, v = (torch.randn(B, HKV, context, D, device="cuda", dtype=DTYPE) for _ in range(2))
    (k_bits, k_values), (v_bits, v_values) = ops.bitmap_compress(k, 0.7), ops.bitmap_compress(v, 0.7)
    out = torch.empty_like(q)
    for config in [(64, 4), (32, 4), (16, 4), (64, 8), (32, 8), (128, 8), (16, 2)]:
        launches = ops.decode_launches(q, k_values, v_values, out, scale=SCALE, interpret=False, k_bits=k_bits,
                                       v_bits=v_bits, config=config)
        ms = bench_ms(lambda: [launch.run() for launch in launches])
        print(f"bitmap decode {context} config {config}: {ms:.3f} ms", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decode-contexts", type=int, nargs="*", default=[4096, 8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--prefill-contexts", type=int, nargs="*", default=[4096, 8192])
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compiles take minutes)")
    parser.add_argument("--sweep", action="store_true", help="only time the prefill kernel's block configurations")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_kernels.py needs a CUDA GPU")
    import triton

    torch.manual_seed(0)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                command="python " + shlex.join(sys.argv), copy_bytes_per_s=copy_bandwidth(),
                shapes=dict(batch=B, q_heads=HQ, kv_heads=HKV, head_dim=D, dtype=str(DTYPE)))
    print(f"{meta['device']}: copy bandwidth {meta['copy_bytes_per_s'] / 1e12:.2f} TB/s", flush=True)
    if args.sweep:
        sweep_key_scores(8192, args.window)
        sweep_bitmap_decode(32768)
        sweep_prefill(8192)
        return
    rec = Recorder(args.json, args.markdown, meta)
    flex = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
    for context in args.decode_contexts:
        run_decode(rec, context, flex)
        torch.cuda.empty_cache()
    for context in args.prefill_contexts:
        run_prefill(rec, context, flex, args.window)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
