# Per-key attention scores for KV eviction: for each key, the softmax probability it receives,
# summed over the queries [q_start, q_len) and over the GROUP query heads that share its KV head.
# Probabilities are exp(q.k * scale - lse) with each query row's log-sum-exp from `prefill`, so no
# T x T matrix is written. One program per (block of BLOCK_N keys, batch x KV head); causal masking
# is bottom-right (query i sits at kv_len - q_len + i), and query blocks that see none of the
# program's keys are skipped.
#
# Specialisations: HEAD_DIM, GROUP, BLOCK_M, BLOCK_N, CAUSAL, UPCAST, DOT_PRECISION.

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def key_scores(q_ptr, k_ptr, lse_ptr, out_ptr, q_len, kv_len, q_start, num_kv_heads, scale,
               sq_b, sq_h, sq_t, sk_b, sk_h, sk_t):
    start_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_kv_heads).to(tl.int64)
    h = bh % num_kv_heads
    j = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    in_k = j < kv_len
    k = tl.load(k_ptr + b * sk_b + h * sk_h + j[:, None] * sk_t + d[None, :], mask=in_k[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    past = kv_len - q_len
    first = q_start
    if CAUSAL:
        first = tl.maximum(q_start, start_n * BLOCK_N - past)  # earlier queries see none of these keys
    qk_scale = scale * LOG2E
    acc = tl.zeros([BLOCK_N], tl.float32)
    for g in range(GROUP):
        hq = h * GROUP + g
        for start in range(first, q_len, BLOCK_M):
            i = start + tl.arange(0, BLOCK_M)
            in_q = i < q_len
            q = tl.load(q_ptr + b * sq_b + hq * sq_h + i[:, None] * sq_t + d[None, :], mask=in_q[:, None], other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
            lse = tl.load(lse_ptr + (b * num_kv_heads * GROUP + hq) * q_len + i, mask=in_q, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale - (lse * LOG2E)[:, None]
            visible = in_q[:, None] & in_k[None, :]
            if CAUSAL:
                visible = visible & (j[None, :] <= past + i[:, None])
            acc += tl.sum(tl.where(visible, tl.exp2(s), 0.0), axis=0)
    tl.store(out_ptr + (b * num_kv_heads + h) * kv_len + j, acc, mask=in_k)
