# Decode attention (one query token) over a KV cache, split along the cache, FlashDecoding-style.
# `decode_partial` runs one program per (batch x KV head, split of that head's tokens): the GROUP query heads that
# share the KV head attend to the chunk's tokens together (GQA: K and V are read once per group)
# and write a normalised partial output with its log2-sum-exp; `combine` merges the chunks.
#
# Specialisations (module globals, written by codegen.render):
#   HEAD_DIM, GROUP (query heads per KV head), BLOCK_G (GROUP padded to tl.dot's 16 rows),
#   BLOCK_N (cache tokens per step), BLOCK_S (splits merged by `combine`, a power of two),
#   VARLEN (1: packed per-head layout, tokens of head (b, h) at rows offsets[b*Hkv+h] ..+ lengths[.]),
#   BITMAP (1: K and V as a bitmap of kept elements plus K_KEPT / V_KEPT packed values per token),
#   UPCAST (1: fp32 math after every load), DOT_PRECISION ("ieee" for fp32 inputs).

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _tile(vals_ptr, bits_ptr, base, bits_base, token, stride_t, valid, KEPT: tl.constexpr):
    """(BLOCK_N, HEAD_DIM) keys or values of cache tokens `token` (BLOCK_N,); 0 where not `valid`."""
    d = tl.arange(0, HEAD_DIM)
    mask = valid[:, None]
    if BITMAP:
        byte = tl.load(bits_ptr + bits_base + token[:, None] * (HEAD_DIM // 8) + d[None, :] // 8, mask=mask, other=0)
        bit = (byte.to(tl.int32) >> (d[None, :] % 8)) & 1  # (BLOCK_N, HEAD_DIM)
        rank = tl.cumsum(bit, axis=1) - 1  # index of each kept element among its token's packed values
        x = tl.load(vals_ptr + base + token[:, None] * stride_t + rank, mask=mask & (bit != 0), other=0.0)
    else:
        x = tl.load(vals_ptr + base + token[:, None] * stride_t + d[None, :], mask=mask, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def decode_partial(q_ptr, k_ptr, v_ptr, k_bits_ptr, v_bits_ptr, offsets_ptr, lengths_ptr, part_out_ptr,
                   part_lse_ptr, num_kv_heads, length, num_splits, scale,
                   sq_b, sq_h, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // num_kv_heads
    h = bh % num_kv_heads
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, HEAD_DIM)
    in_group = g < GROUP
    q = tl.load(q_ptr + b.to(tl.int64) * sq_b + (h * GROUP + g[:, None]) * sq_h + d[None, :],
                mask=in_group[:, None], other=0.0)  # (BLOCK_G, HEAD_DIM)
    if UPCAST:
        q = q.to(tl.float32)
    if VARLEN:
        first = tl.load(offsets_ptr + bh).to(tl.int64)
        count = tl.load(lengths_ptr + bh)
        k_base = first * sk_t
        v_base = first * sv_t
    else:
        count = length
        k_base = b.to(tl.int64) * sk_b + h.to(tl.int64) * sk_h
        v_base = b.to(tl.int64) * sv_b + h.to(tl.int64) * sv_h
    bits_base = bh.to(tl.int64) * length * (HEAD_DIM // 8)  # BITMAP: bits are (B, Hkv, L, HEAD_DIM / 8)
    chunk = tl.cdiv(tl.cdiv(count, num_splits), BLOCK_N) * BLOCK_N  # each head splits its own length
    lo = split * chunk
    hi = tl.minimum(lo + chunk, count)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    qk_scale = scale * LOG2E
    for start in range(lo, hi, BLOCK_N):
        token = start + tl.arange(0, BLOCK_N)
        valid = token < hi
        k = _tile(k_ptr, k_bits_ptr, k_base, bits_base, token, sk_t, valid, K_KEPT)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_G, BLOCK_N)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v = _tile(v_ptr, v_bits_ptr, v_base, bits_base, token, sv_t, valid, V_KEPT)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new
    row = (bh * num_splits + split) * GROUP + g  # partials are (B, Hkv, S, GROUP, [HEAD_DIM])
    has = l > 0
    out = acc / tl.where(has, l, 1.0)[:, None]
    tl.store(part_out_ptr + row[:, None].to(tl.int64) * HEAD_DIM + d[None, :], out, mask=in_group[:, None])
    tl.store(part_lse_ptr + row, tl.where(has, m + tl.log2(tl.where(has, l, 1.0)), float("-inf")), mask=in_group)


@triton.jit
def combine(part_out_ptr, part_lse_ptr, out_ptr, num_splits, num_q_heads, so_b, so_h):
    """One program per (batch, query head): the softmax-weighted mean of its splits' partials."""
    pid = tl.program_id(0)  # b * Hq + hq == (b * Hkv + h) * GROUP + g
    bh = pid // GROUP
    g = pid % GROUP
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, HEAD_DIM)
    valid = s < num_splits
    row = (bh * num_splits + s) * GROUP + g  # (BLOCK_S,)
    lse = tl.load(part_lse_ptr + row, mask=valid, other=float("-inf"))
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)  # every split empty: all weights 0, output 0
    weight = tl.where(lse == float("-inf"), 0.0, tl.exp2(lse - top))  # an empty split weighs nothing
    total = tl.sum(weight, axis=0)
    parts = tl.load(part_out_ptr + row[:, None].to(tl.int64) * HEAD_DIM + d[None, :], mask=valid[:, None], other=0.0)
    out = tl.sum(parts * weight[:, None], axis=0) / tl.where(total > 0, total, 1.0)  # (HEAD_DIM,)
    b = pid // num_q_heads
    hq = pid % num_q_heads
    tl.store(out_ptr + b.to(tl.int64) * so_b + hq * so_h + d, out.to(out_ptr.dtype.element_ty))
