"""The fused Triton block-sparse attention kernel (forward prefill).

Structure follows Triton's fused-attention tutorial (FlashAttention-2 online softmax, fp32 accumulation,
``exp2`` with the scale folded in), with the key loop driven by the plan's block lists instead of a range:

- one program per (query tile of ``BLOCK_M`` rows, batch x head); the heaviest query tiles start first;
- it walks the *full* key blocks of its plan row without any masking, then the ragged last key block (if it
  is listed) with bounds checks only, then the *partial* blocks with the causal and token-pattern tests;
- a plan block of ``PLAN_BLOCK`` keys is visited as ``PLAN_BLOCK // BLOCK_N`` tiles in one flat loop, so the
  software pipeliner sees a single loop, with the block index loaded one iteration ahead;
- query head ``h`` reads KV head ``h // (H // KVH)``: K/V are never repeated.

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


@triton.jit
def _attend_blocks(
    acc, l_i, m_i, q,
    k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, desc_k, desc_v, b, kvh,
    idx_base, first, last,
    rows, rows_valid, positions, offs_n, offs_d, kv_len, qk_scale,
    kv_lo, kv_hi,
    mask_base, stride_mask_m, stride_mask_n,
    diag_base, col_base, diag_len, corner_base, corner_len,
    PLAN_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, PARTIAL: tl.constexpr, BOUNDS: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_PATTERN: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_KV_RANGE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr,
):
    """Fold the key tiles of list entries ``[first, last)`` into the running ``(acc, l_i, m_i)``.

    ``rows``: query row indices ``[BLOCK_M]`` (``rows_valid``: those below ``q_len``); ``positions``: their key
    positions (row + q_offset)."""
    SUB: tl.constexpr = PLAN_BLOCK // BLOCK_N
    MASKED: tl.constexpr = PARTIAL or BOUNDS or HAS_MASK or HAS_KV_RANGE
    # The next tile's block index is loaded one iteration ahead, so the K/V address of the next tile is known
    # early and the pipeliner can prefetch it (measured on H100: 455 -> 504 TFLOP/s dense causal at 16K).
    next_block = tl.load(idx_base + first, mask=first < last, other=0)
    for it in range(first * SUB, last * SUB):
        block = next_block
        next_block = tl.load(idx_base + (it + 1) // SUB, mask=it + 1 < last * SUB, other=0)
        start_n = block * PLAN_BLOCK + (it % SUB) * BLOCK_N
        cols = start_n + offs_n
        kv_valid = cols < kv_len
        k_ptrs = k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd
        v_ptrs = v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd
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
                    diag = positions[:, None] - cols[None, :] + kv_len - 1
                    on_diag = tl.load(diag_base + diag, mask=(diag >= 0) & (diag < diag_len), other=0)
                    on_col = tl.load(col_base + cols, mask=kv_valid, other=0)
                    on_pattern = (on_diag != 0) | (on_col != 0)[None, :]
                    # Inside the PCL x PCL corner, the true mask decides (corner_len is 0 without one).
                    in_corner = (positions[:, None] < corner_len) & (cols[None, :] < corner_len)
                    corner_at = tl.where(in_corner, positions[:, None] * corner_len + cols[None, :], 0)
                    on_corner = tl.load(corner_base + corner_at, mask=in_corner, other=0)
                    keep = keep & tl.where(in_corner, on_corner != 0, on_pattern)
            if HAS_MASK:
                tile = tl.load(
                    mask_base + rows[:, None].to(tl.int64) * stride_mask_m + cols[None, :] * stride_mask_n,  # N x N masks pass 2**31
                    mask=rows_valid[:, None] & kv_valid[None, :], other=0,
                )
                if MASK_IS_BOOL:
                    keep = keep & (tile != 0)
                else:
                    tile = tile.to(tl.float32)
                    tile = tl.where(tile == float("-inf"), tile, tl.maximum(tile, MASK_FLOOR))
                    s = s + tile * LOG2E
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
def block_sparse_attention_fwd(
    Q, K, V, Out, Lse,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    Counts, Indices, stride_cb, stride_ch, stride_cm, stride_ib, stride_ih, stride_im,
    FullCounts, FullIndices, stride_fcb, stride_fch, stride_fcm, stride_fib, stride_fih, stride_fim,
    Mask, stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
    DiagBits, ColBits, stride_diag_h, stride_col_h, diag_len, Corner, stride_corner_h, corner_len,
    KvRange, DescK, DescV,
    heads, group, q_len, kv_len, q_offset, sm_scale, tune_len,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PLAN_BLOCK: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_FULL: tl.constexpr, HAS_PATTERN: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_KV_RANGE: tl.constexpr,
    EVEN_N: tl.constexpr, WRITE_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid ``(B * H, cdiv(q_len, BLOCK_M))``. Shapes: Q ``[B, H, Lq, E]``, K/V ``[B, KVH, Lk, E]``,
    Out ``[B, H, Lq, E]``, Lse ``[B, H, Lq]`` (fp32, natural log). Plan strides are 0 on broadcast dims."""
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

    q_ptrs = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=rows_valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b64 * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + kvh.to(tl.int64) * stride_vh

    kv_lo = 0
    kv_hi = kv_len
    if HAS_KV_RANGE:
        kv_lo = tl.load(KvRange + 2 * b)
        kv_hi = tl.load(KvRange + 2 * b + 1)
    mask_base = Mask
    if HAS_MASK:
        mask_base = Mask + b64 * stride_mask_b + h.to(tl.int64) * stride_mask_h
    diag_base = DiagBits
    col_base = ColBits
    corner_base = Corner
    if HAS_PATTERN:
        diag_base = DiagBits + h * stride_diag_h
        col_base = ColBits + h * stride_col_h
        corner_base = Corner + h * stride_corner_h

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * LOG2E

    if HAS_FULL:
        n_full = tl.load(FullCounts + b * stride_fcb + h * stride_fch + plan_row * stride_fcm)
        full_idx = FullIndices + b * stride_fib + h * stride_fih + plan_row * stride_fim
        n_fast = n_full
        if not EVEN_N:
            # Only the last key block can be ragged; sorted lists put it last.
            if n_full > 0:
                last_block = tl.load(full_idx + n_full - 1)
                if (last_block + 1) * PLAN_BLOCK > kv_len:
                    n_fast = n_full - 1
        acc, l_i, m_i = _attend_blocks(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, DescK, DescV, b, kvh,
            full_idx, 0, n_fast, offs_m, rows_valid, positions, offs_n, offs_d, kv_len, qk_scale, kv_lo, kv_hi,
            mask_base, stride_mask_m, stride_mask_n, diag_base, col_base, diag_len, corner_base, corner_len,
            PLAN_BLOCK, BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D, False, False, IS_CAUSAL, HAS_PATTERN,
            HAS_MASK, MASK_IS_BOOL, HAS_KV_RANGE, DOT_PRECISION, UPCAST, USE_TMA,
        )
        if not EVEN_N:
            acc, l_i, m_i = _attend_blocks(
                acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, DescK, DescV, b, kvh,
                full_idx, n_fast, n_full, offs_m, rows_valid, positions, offs_n, offs_d, kv_len, qk_scale, kv_lo, kv_hi,
                mask_base, stride_mask_m, stride_mask_n, diag_base, col_base, diag_len, corner_base, corner_len,
                PLAN_BLOCK, BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D, False, True, IS_CAUSAL, HAS_PATTERN,
                HAS_MASK, MASK_IS_BOOL, HAS_KV_RANGE, DOT_PRECISION, UPCAST, USE_TMA,
            )

    n_partial = tl.load(Counts + b * stride_cb + h * stride_ch + plan_row * stride_cm)
    partial_idx = Indices + b * stride_ib + h * stride_ih + plan_row * stride_im
    acc, l_i, m_i = _attend_blocks(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, DescK, DescV, b, kvh,
        partial_idx, 0, n_partial, offs_m, rows_valid, positions, offs_n, offs_d, kv_len, qk_scale, kv_lo, kv_hi,
        mask_base, stride_mask_m, stride_mask_n, diag_base, col_base, diag_len, corner_base, corner_len,
        PLAN_BLOCK, BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D, True, not EVEN_N, IS_CAUSAL, HAS_PATTERN,
        HAS_MASK, MASK_IS_BOOL, HAS_KV_RANGE, DOT_PRECISION, UPCAST, USE_TMA,
    )

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    o_ptrs = Out + b64 * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=rows_valid[:, None] & (offs_d[None, :] < HEAD_DIM))
    if WRITE_LSE:
        lse = tl.where(has_keys, (m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0))) * LN2, float("-inf"))
        tl.store(Lse + bh.to(tl.int64) * q_len + offs_m, lse, mask=rows_valid)
