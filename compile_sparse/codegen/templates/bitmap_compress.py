# Mustafar-style per-token magnitude pruning of K or V into a bitmap plus packed values.
# Each token (a row of HEAD_DIM elements) keeps exactly KEPT elements: those with the largest |x|,
# ties at the threshold broken towards lower indices. Output: bits (rows, HEAD_DIM / 8) uint8, bit
# e % 8 of byte e // 8 set when element e is kept; values (rows, KEPT) in element order.
#
# Specialisations: HEAD_DIM (a power of two, >= 8), KEPT, BLOCK_R (rows per program).


@triton.jit
def compress(x_ptr, bits_ptr, vals_ptr, rows):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, HEAD_DIM)
    in_r = r < rows
    row = r.to(tl.int64)[:, None]
    x = tl.load(x_ptr + row * HEAD_DIM + d[None, :], mask=in_r[:, None], other=0.0)  # (BLOCK_R, HEAD_DIM)
    size = tl.abs(x.to(tl.float32))
    ordered = tl.sort(size, dim=1, descending=True)
    threshold = tl.sum(tl.where(d[None, :] == KEPT - 1, ordered, 0.0), axis=1)  # KEPT-th largest |x|
    above = size > threshold[:, None]
    tie = size == threshold[:, None]
    need = KEPT - tl.sum(above.to(tl.int32), axis=1)  # ties to keep, lowest indices first
    keep = above | (tie & (tl.cumsum(tie.to(tl.int32), axis=1) <= need[:, None]))
    rank = tl.cumsum(keep.to(tl.int32), axis=1) - 1
    tl.store(vals_ptr + row * KEPT + rank, x, mask=in_r[:, None] & keep)
    bits = tl.reshape(keep.to(tl.int32), [BLOCK_R, HEAD_DIM // 8, 8])  # (BLOCK_R, bytes, 8)
    byte = tl.sum(bits << tl.arange(0, 8)[None, None, :], axis=2)  # (BLOCK_R, HEAD_DIM / 8)
    tl.store(bits_ptr + row * (HEAD_DIM // 8) + tl.arange(0, HEAD_DIM // 8)[None, :], byte.to(tl.uint8),
             mask=in_r[:, None])
