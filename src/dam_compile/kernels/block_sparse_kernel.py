"""The fused Triton block-sparse attention kernel (forward prefill).

Structure follows Triton's fused-attention tutorial (FlashAttention-2 online softmax, fp32 accumulation,
``exp2`` with the scale folded in), with the key loop driven by the plan's block lists instead of a range:

- one program per (query tile of ``BLOCK_M`` rows, batch x head); the heaviest query tiles start first;
- it walks its plan row's key blocks three times (the tutorial's ``STAGE``; here ``WALK``): the *full* blocks
  without any masking, then the ragged last key block (if it is listed) with bounds checks only, then the
  *partial* blocks with the causal and token-pattern tests;
- a plan block of ``PLAN_BLOCK`` keys is visited as ``PLAN_BLOCK // BLOCK_N`` tiles in one flat loop, so the
  software pipeliner sees a single loop, with the block index loaded one iteration ahead;
- query head ``h`` reads KV head ``h // (H // KVH)``: K/V are never repeated.

Pointers travel with their strides as tuples (``(Q, (batch, head, row, dim) strides)``, the plan's lists, the
mask, the token pattern), so one argument names one operand.

``UPCAST`` (set only under the CPU interpreter, whose ``tl.dot`` mishandles bfloat16) does the dots in
float32 on bfloat16 data.

A query row that keeps no key at all gets zeros (and ``-inf`` log-sum-exp): the running max is made safe
before ``exp2`` in every masked tile, and the epilogue divides by ``max(l, tiny)`` only where ``l > 0``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .constants import LN2, LOG2E

# Finite floor for additive float masks: bf16/fp32 "minimum" masks (-3.4e38) times log2(e) overflow to -inf,
# which would zero a row SDPA attends uniformly. -inf entries stay -inf.
MASK_FLOOR = tl.constexpr(-1.0e30)

# The walks over a plan row (the ``WALK`` constexpr of _attend_blocks).
WALK_FULL = tl.constexpr(1)  # full blocks inside the keys: no test at all
WALK_RAGGED = tl.constexpr(2)  # the listed full block that the keys' end cuts: bounds checks only
WALK_PARTIAL = tl.constexpr(3)  # partial blocks: causal and token-pattern tests (and bounds unless EVEN_N)


@triton.jit
def _attend_blocks(acc, l_i, m_i, row, walk_list, WALK: tl.constexpr, SHAPE: tl.constexpr, MODE: tl.constexpr):
    """Fold the key tiles of the list entries ``walk_list = (indices, first, last)`` into the running
    ``(acc, l_i, m_i)`` of one query tile.

    ``row``: what every walk of the tile reads, ``(q, qk_scale, keys, kv_bounds, tile, mask, pattern)``.

    ``SHAPE``: ``(PLAN_BLOCK, BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D)``; ``MODE``: the kernel's mode constexprs
    (see :func:`block_sparse_attention_fwd`); ``WALK``: one of the ``WALK_*`` constants.
    ``keys``: ``(k_base, v_base, (stride_kn, stride_kd), (stride_vn, stride_vd), desc_k, desc_v, b, kvh)``;
    ``kv_bounds``: ``(kv_len, kv_lo, kv_hi)``; ``tile``: ``(rows [BLOCK_M], rows_valid, positions, offs_n,
    offs_d)`` with positions the rows' key positions (row + q_offset); ``mask``: ``(base, (stride_m,
    stride_n))``; ``pattern``: ``(diag_base, col_base, diag_len, corner_base, corner_len)``."""
    # Constexpr tuples are read item by item: unpacking them would turn the items into runtime values.
    PLAN_BLOCK: tl.constexpr = SHAPE[0]
    BLOCK_M: tl.constexpr = SHAPE[1]
    BLOCK_N: tl.constexpr = SHAPE[2]
    HEAD_DIM: tl.constexpr = SHAPE[3]
    BLOCK_D: tl.constexpr = SHAPE[4]
    IS_CAUSAL: tl.constexpr = MODE[0]
    HAS_PATTERN: tl.constexpr = MODE[1]
    HAS_MASK: tl.constexpr = MODE[2]
    MASK_IS_BOOL: tl.constexpr = MODE[3]
    HAS_KV_RANGE: tl.constexpr = MODE[4]
    EVEN_N: tl.constexpr = MODE[5]
    DOT_PRECISION: tl.constexpr = MODE[6]
    UPCAST: tl.constexpr = MODE[7]
    USE_TMA: tl.constexpr = MODE[8]
    SUB: tl.constexpr = PLAN_BLOCK // BLOCK_N
    PARTIAL: tl.constexpr = WALK == WALK_PARTIAL
    BOUNDS: tl.constexpr = (WALK == WALK_RAGGED) or (PARTIAL and not EVEN_N)
    MASKED: tl.constexpr = PARTIAL or BOUNDS or HAS_MASK or HAS_KV_RANGE
    q, qk_scale, keys, kv_bounds, tile, mask, pattern = row
    k_base, v_base, k_strides, v_strides, desc_k, desc_v, b, kvh = keys
    kv_len, kv_lo, kv_hi = kv_bounds
    idx_base, first, last = walk_list
    rows, rows_valid, positions, offs_n, offs_d = tile
    # The next tile's block index is loaded one iteration ahead, so the K/V address of the next tile is known
    # early and the pipeliner can prefetch it (measured on H100: 455 -> 504 TFLOP/s dense causal at 16K).
    next_block = tl.load(idx_base + first, mask=first < last, other=0)
    for it in range(first * SUB, last * SUB):
        block = next_block
        next_block = tl.load(idx_base + (it + 1) // SUB, mask=it + 1 < last * SUB, other=0)
        start_n = block * PLAN_BLOCK + (it % SUB) * BLOCK_N
        cols = start_n + offs_n
        kv_valid = cols < kv_len
        k_ptrs = k_base + cols[:, None] * k_strides[0] + offs_d[None, :] * k_strides[1]
        v_ptrs = v_base + cols[:, None] * v_strides[0] + offs_d[None, :] * v_strides[1]
        # TMA zero-fills rows and columns past the tensor's end. Otherwise unmasked loads where nothing can be
        # out of range: they pipeline and vectorise best.
        if USE_TMA:
            k = desc_k.load([b, kvh, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        elif BOUNDS:
            kv_mask = kv_valid[:, None] & (offs_d[None, :] < HEAD_DIM)
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        elif HEAD_DIM != BLOCK_D:
            kv_mask = offs_d[None, :] < HEAD_DIM
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        else:
            k = tl.load(k_ptrs)
        if UPCAST:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if MASKED:
            s = qk * qk_scale
            if BOUNDS:
                keep = tl.broadcast_to(kv_valid[None, :], (BLOCK_M, BLOCK_N))
            else:
                keep = tl.full((BLOCK_M, BLOCK_N), True, tl.int1)
            if HAS_KV_RANGE:
                keep = keep & ((cols >= kv_lo) & (cols < kv_hi))[None, :]
            if PARTIAL:
                if IS_CAUSAL:
                    keep = keep & (cols[None, :] <= positions[:, None])
                if HAS_PATTERN:
                    keep = keep & _on_token_pattern(pattern, positions, cols, kv_valid, kv_len)
            if HAS_MASK:
                tile_mask = tl.load(  # int64 rows: N x N masks pass 2**31 elements
                    mask[0] + rows[:, None].to(tl.int64) * mask[1][0] + cols[None, :] * mask[1][1],
                    mask=rows_valid[:, None] & kv_valid[None, :], other=0,
                )
                if MASK_IS_BOOL:
                    keep = keep & (tile_mask != 0)
                else:
                    tile_mask = tile_mask.to(tl.float32)
                    tile_mask = tl.where(tile_mask == float("-inf"), tile_mask, tl.maximum(tile_mask, MASK_FLOOR))
                    s = s + tile_mask * LOG2E
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if USE_TMA:
            v = desc_v.load([b, kvh, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        elif BOUNDS or HEAD_DIM != BLOCK_D:
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        else:
            v = tl.load(v_ptrs)
        if UPCAST:
            v = v.to(tl.float32)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _on_token_pattern(pattern, positions, cols, kv_valid, kv_len):
    """``[BLOCK_M, BLOCK_N]``: which (row, key) pairs DAM's token pattern keeps: on a kept diagonal or column,
    or, inside the PCL x PCL corner, in the true mask (``corner_len`` is 0 without one)."""
    diag_base, col_base, diag_len, corner_base, corner_len = pattern
    diag = positions[:, None] - cols[None, :] + kv_len - 1
    on_diag = tl.load(diag_base + diag, mask=(diag >= 0) & (diag < diag_len), other=0)
    on_col = tl.load(col_base + cols, mask=kv_valid, other=0)
    on_pattern = (on_diag != 0) | (on_col != 0)[None, :]
    in_corner = (positions[:, None] < corner_len) & (cols[None, :] < corner_len)
    corner_at = tl.where(in_corner, positions[:, None] * corner_len + cols[None, :], 0)
    on_corner = tl.load(corner_base + corner_at, mask=in_corner, other=0)
    return tl.where(in_corner, on_corner != 0, on_pattern)


@triton.jit
def _plan_row(lists, b, h, plan_row):
    """``(count, indices pointer)`` of one plan row; ``lists``: ``(Counts, (b, h, m) strides, Indices, (b, h, m)
    strides)`` (stride 0 on broadcast dims)."""
    counts, count_strides, indices, index_strides = lists
    count = tl.load(counts + b * count_strides[0] + h * count_strides[1] + plan_row * count_strides[2])
    return count, indices + b * index_strides[0] + h * index_strides[1] + plan_row * index_strides[2]


@triton.jit
def block_sparse_attention_fwd(
    Q, q_strides, K, k_strides, V, v_strides, Out, o_strides, Lse,
    partial_lists, full_lists, mask, pattern, KvRange, DescK, DescV,
    heads, group, q_len, kv_len, q_offset, sm_scale, tune_len,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PLAN_BLOCK: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_FULL: tl.constexpr, HAS_PATTERN: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_KV_RANGE: tl.constexpr,
    EVEN_N: tl.constexpr, WRITE_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid ``(B * H, cdiv(q_len, BLOCK_M))``. Shapes: Q ``[B, H, Lq, E]``, K/V ``[B, KVH, Lk, E]``,
    Out ``[B, H, Lq, E]``, Lse ``[B, H, Lq]`` (fp32, natural log); ``*_strides``: ``(batch, head, row, dim)``.
    ``partial_lists`` / ``full_lists``: ``(Counts [B, H, Mq], its strides, Indices [B, H, Mq, K], its first
    three strides)``, stride 0 on broadcast dims. ``mask``: ``(Mask, (b, h, m, n) strides)``. ``pattern``:
    ``(DiagBits, ColBits, (diag, col) head strides, diag_len, Corner, corner head stride, corner_len)``."""
    tl.static_assert(PLAN_BLOCK % BLOCK_M == 0)
    tl.static_assert(PLAN_BLOCK % BLOCK_N == 0)
    bh = tl.program_id(0)
    tile_m = tl.num_programs(1) - 1 - tl.program_id(1)  # heaviest (causal: last) query tiles first
    b = bh // heads
    h = bh % heads
    kvh = h // group
    b64 = b.to(tl.int64)
    plan_row = (tile_m * BLOCK_M) // PLAN_BLOCK

    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows_valid = offs_m < q_len
    positions = offs_m + q_offset
    tile = (offs_m, rows_valid, positions, offs_n, offs_d)

    q_ptrs = (Q + b64 * q_strides[0] + h.to(tl.int64) * q_strides[1] + offs_m[:, None] * q_strides[2]
              + offs_d[None, :] * q_strides[3])
    q = tl.load(q_ptrs, mask=rows_valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    keys = (K + b64 * k_strides[0] + kvh.to(tl.int64) * k_strides[1],
            V + b64 * v_strides[0] + kvh.to(tl.int64) * v_strides[1],
            (k_strides[2], k_strides[3]), (v_strides[2], v_strides[3]), DescK, DescV, b, kvh)

    kv_lo = 0
    kv_hi = kv_len
    if HAS_KV_RANGE:
        kv_lo = tl.load(KvRange + 2 * b)
        kv_hi = tl.load(KvRange + 2 * b + 1)
    kv_bounds = (kv_len, kv_lo, kv_hi)
    mask_base = mask[0]
    if HAS_MASK:
        mask_base = mask[0] + b64 * mask[1][0] + h.to(tl.int64) * mask[1][1]
    row_mask = (mask_base, (mask[1][2], mask[1][3]))
    diag_base, col_base, pattern_strides, diag_len, corner_base, corner_stride, corner_len = pattern
    if HAS_PATTERN:
        diag_base += h * pattern_strides[0]
        col_base += h * pattern_strides[1]
        corner_base += h * corner_stride
    head_pattern = (diag_base, col_base, diag_len, corner_base, corner_len)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * LOG2E
    row = (q, qk_scale, keys, kv_bounds, tile, row_mask, head_pattern)
    SHAPE: tl.constexpr = (PLAN_BLOCK, BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D)
    MODE: tl.constexpr = (IS_CAUSAL, HAS_PATTERN, HAS_MASK, MASK_IS_BOOL, HAS_KV_RANGE, EVEN_N, DOT_PRECISION,
                          UPCAST, USE_TMA)

    if HAS_FULL:
        n_full, full_idx = _plan_row(full_lists, b, h, plan_row)
        n_fast = n_full
        if not EVEN_N:
            # Only the last key block can be ragged; sorted lists put it last. Branch-free: Triton 3.6 loses
            # the constexpr items of tuples (strides of 1) across a runtime `if`.
            last_block = tl.load(full_idx + n_full - 1, mask=n_full > 0, other=0)
            n_fast = tl.where((n_full > 0) & ((last_block + 1) * PLAN_BLOCK > kv_len), n_full - 1, n_full)
        acc, l_i, m_i = _attend_blocks(acc, l_i, m_i, row, (full_idx, 0, n_fast), WALK_FULL, SHAPE, MODE)
        if not EVEN_N:
            acc, l_i, m_i = _attend_blocks(acc, l_i, m_i, row, (full_idx, n_fast, n_full), WALK_RAGGED, SHAPE, MODE)

    n_partial, partial_idx = _plan_row(partial_lists, b, h, plan_row)
    acc, l_i, m_i = _attend_blocks(acc, l_i, m_i, row, (partial_idx, 0, n_partial), WALK_PARTIAL, SHAPE, MODE)

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    o_ptrs = (Out + b64 * o_strides[0] + h.to(tl.int64) * o_strides[1] + offs_m[:, None] * o_strides[2]
              + offs_d[None, :] * o_strides[3])
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=rows_valid[:, None] & (offs_d[None, :] < HEAD_DIM))
    if WRITE_LSE:
        lse = tl.where(has_keys, (m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0))) * LN2, float("-inf"))
        tl.store(Lse + bh.to(tl.int64) * q_len + offs_m, lse, mask=rows_valid)
