# Prefill attention (FlashAttention-style forward) that also writes each query row's log-sum-exp,
# which `key_scores` needs to turn logits into softmax probabilities without a T x T matrix.
# One program per (block of BLOCK_M queries, batch x query head); GQA reads the KV head hq // GROUP.
# Causal masking is aligned bottom-right through positions: query i sits at `past + i`, key j at j
# (or, when GATHER, at index[b, h, j]: the program attends only to those tokens of the full K / V,
# without materialising the gather; any order).
#
# Specialisations: HEAD_DIM, GROUP, BLOCK_M, BLOCK_N, CAUSAL, GATHER, UPCAST, DOT_PRECISION.

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _attend(acc, l, m, q, q_pos, k_ptr, v_ptr, index_ptr, k_base, v_base, index_base, sk_t, sv_t, kv_len,
            qk_scale, lo, hi, MASKED: tl.constexpr):
    """Online-softmax accumulation of keys [lo, hi) (MASKED: with the causal / length masks)."""
    d = tl.arange(0, HEAD_DIM)
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        valid = j < kv_len
        if GATHER:
            token = tl.load(index_ptr + index_base + j, mask=valid, other=0).to(tl.int64)
        else:
            token = j.to(tl.int64)
        if MASKED:
            k = tl.load(k_ptr + k_base + token[:, None] * sk_t + d[None, :], mask=valid[:, None], other=0.0)
        else:
            k = tl.load(k_ptr + k_base + token[:, None] * sk_t + d[None, :])
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        if MASKED:
            visible = valid[None, :]
            if CAUSAL:
                visible = visible & (token[None, :] <= q_pos[:, None])
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        if MASKED:
            v = tl.load(v_ptr + v_base + token[:, None] * sv_t + d[None, :], mask=valid[:, None], other=0.0)
        else:
            v = tl.load(v_ptr + v_base + token[:, None] * sv_t + d[None, :])
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new
    return acc, l, m


@triton.jit
def prefill(q_ptr, k_ptr, v_ptr, index_ptr, out_ptr, lse_ptr, q_len, kv_len, past, num_q_heads, scale,
            sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, si_b, si_h, so_b, so_h, so_t):
    start_m = tl.program_id(0)
    bhq = tl.program_id(1)
    b = (bhq // num_q_heads).to(tl.int64)
    hq = bhq % num_q_heads
    h = hq // GROUP
    i = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    in_q = i < q_len
    q = tl.load(q_ptr + b * sq_b + hq * sq_h + i[:, None] * sq_t + d[None, :], mask=in_q[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = past + i  # (BLOCK_M,)
    k_base = b * sk_b + h * sk_h
    v_base = b * sv_b + h * sv_h
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    qk_scale = scale * LOG2E
    masked_from = 0
    hi = kv_len
    if CAUSAL and not GATHER:
        # blocks every row of this program sees whole: no mask; then the diagonal blocks, masked
        masked_from = tl.minimum(past + start_m * BLOCK_M + 1, kv_len) // BLOCK_N * BLOCK_N
        hi = tl.minimum(kv_len, past + (start_m + 1) * BLOCK_M)  # later keys are masked for every row
        acc, l, m = _attend(acc, l, m, q, q_pos, k_ptr, v_ptr, index_ptr, k_base, v_base, b * si_b + h * si_h,
                            sk_t, sv_t, kv_len, qk_scale, 0, masked_from, False)
    acc, l, m = _attend(acc, l, m, q, q_pos, k_ptr, v_ptr, index_ptr, k_base, v_base, b * si_b + h * si_h,
                        sk_t, sv_t, kv_len, qk_scale, masked_from, hi, True)
    has = l > 0
    out = acc / tl.where(has, l, 1.0)[:, None]
    tl.store(out_ptr + b * so_b + hq * so_h + i[:, None] * so_t + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=in_q[:, None])
    lse = tl.where(has, (m + tl.log2(tl.where(has, l, 1.0))) * LN2, float("-inf"))  # natural log
    tl.store(lse_ptr + (b * num_q_heads + hq) * q_len + i, lse, mask=in_q)
