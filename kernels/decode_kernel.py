"""Block-sparse decode: one query row per (batch, head) against a long KV cache, reading only kept key blocks.

A decode step is bound by memory traffic, not by matrix units. So each KV head's key blocks are read once for
all the query heads that share it (GQA): a program takes the group's query rows as one tile, reads each key
block that any of their lists keeps, and scores each row only on the blocks its own list keeps. One program per
KV head gives far too few for the GPU, so, as in FlashDecoding, the key blocks are split across ``splits``
programs; each writes a partial softmax per query row (running max, sum, weighted values), and one more launch
merges them. Nothing is read back to the host (the call can be captured in a CUDA graph).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl
from torch import Tensor

from .constants import LOG2E
from .block_sparse_launch import dot_options
from .launch_common import cdiv, interpreting, next_power_of_2, sm_count, softmax_scale
from .reference import check_heads


@triton.jit
def sparse_decode_partials(
    Q, K, V, Counts, Indices, Mask, PartMax, PartSum, PartAcc,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_cb, stride_ch,
    stride_ib, stride_ih, stride_ik,
    stride_mb, stride_mh, stride_mn,
    heads, kv_heads, group, kv_len, num_blocks, splits, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PLAN_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUP_PAD: tl.constexpr, SEARCH_STEPS: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Program ``(b * kv_heads + kvh, split)``: softmax partials of the ``group`` query rows that share KV head
    ``kvh`` over the split's range of key blocks. A block is read once for the whole group (``GROUP_PAD`` rows
    in one ``tl.dot``) when any row's list ``Indices[b, h, :Counts[b, h]]`` (ascending) keeps it, and each row's
    scores count only where its own list does. Each row walks its list with a cursor, placed at the split's
    first block by a binary search of ``SEARCH_STEPS`` (the list width's bit length) steps. Partials:
    ``PartMax``/``PartSum`` ``[B*H, splits]`` (base-2 logits), ``PartAcc`` ``[B*H, splits, BLOCK_D]``."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    b = (row // kv_heads).to(tl.int64)  # offsets of a long cache pass 2**31
    kvh = (row % kv_heads).to(tl.int64)
    per_split = (num_blocks + splits - 1) // splits
    first = split * per_split
    last = tl.minimum(first + per_split, num_blocks)

    offs_g = tl.arange(0, GROUP_PAD)
    g_ok = offs_g < group
    h = kvh * group + offs_g  # the group's query heads
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    count = tl.load(Counts + b * stride_cb + h * stride_ch, mask=g_ok, other=0)
    lists = Indices + b * stride_ib + h * stride_ih
    lo = tl.zeros([GROUP_PAD], tl.int32)  # per row: the first list entry >= first (lower bound)
    hi = count
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        below = tl.load(lists + mid * stride_ik, mask=lo < hi, other=first) < first
        lo = tl.where((lo < hi) & below, mid + 1, lo)
        hi = tl.where((lo < hi) & ~below, mid, hi)
    cursor = lo
    qk_scale = scale * LOG2E
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], dtype=tl.float32)
    for block in range(first, last):
        member = tl.load(lists + cursor * stride_ik, mask=cursor < count, other=-1) == block
        cursor += member.to(tl.int32)
        if tl.max(member.to(tl.int32), axis=0) > 0:  # some row of the group keeps the block: read it once
            for sub in tl.static_range(0, PLAN_BLOCK, BLOCK_N):
                offs_n = block * PLAN_BLOCK + sub + tl.arange(0, BLOCK_N).to(tl.int64)  # int64: long caches
                n_ok = offs_n < kv_len
                k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                            mask=n_ok[:, None] & d_ok[None, :], other=0.0)
                # V is requested with K, so both tiles' bytes are in flight together (the kernel is memory-bound).
                v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                            mask=n_ok[:, None] & d_ok[None, :], other=0.0)
                if UPCAST:
                    k = k.to(tl.float32)
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
                keep = member[:, None] & n_ok[None, :]
                if HAS_MASK:
                    m_ptr = Mask + b * stride_mb + h[:, None] * stride_mh + offs_n[None, :] * stride_mn
                    tile_mask = tl.load(m_ptr, mask=g_ok[:, None] & n_ok[None, :], other=0)
                    if MASK_IS_BOOL:
                        keep = keep & (tile_mask != 0)
                    else:
                        s = s + tile_mask.to(tl.float32) * LOG2E
                s = tl.where(keep, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile without visible keys adds nothing
                alpha = tl.exp2(m_i - m_safe)
                p = tl.exp2(s - m_safe[:, None])
                if UPCAST:
                    v = v.to(tl.float32)
                l_i = l_i * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
                m_i = m_new
    out = (b * heads + h) * splits + split
    tl.store(PartMax + out, m_i, mask=g_ok)
    tl.store(PartSum + out, l_i, mask=g_ok)
    tl.store(PartAcc + out[:, None] * BLOCK_D + offs_d[None, :], acc, mask=g_ok[:, None])


@triton.jit
def merge_decode_partials(
    PartMax, PartSum, PartAcc, Out, splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr,
):
    """Program ``row``: ``Out[row, :HEAD_DIM]`` from the row's ``splits`` partials (as :func:`merge_partials`,
    in one launch instead of a chain of PyTorch ops: a decode step's host time is its cost without CUDA graphs).
    ``SPLITS``: ``splits`` rounded up to a power of two."""
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    in_row = offs_s < splits
    part_max = tl.load(PartMax + row * splits + offs_s, mask=in_row, other=float("-inf"))
    top = tl.max(part_max, axis=0)
    weight = tl.exp2(part_max - tl.where(top == float("-inf"), 0.0, top))  # empty splits weigh 0
    total = tl.sum(tl.load(PartSum + row * splits + offs_s, mask=in_row, other=0.0) * weight, axis=0)
    acc = tl.load(PartAcc + (row * splits + offs_s)[:, None] * BLOCK_D + offs_d[None, :], mask=in_row[:, None],
                  other=0.0)
    out = tl.sum(acc * weight[:, None], axis=0) / tl.maximum(total, 1.1754943508222875e-38)
    tl.store(Out + row * HEAD_DIM + offs_d, out.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM)


def decode_splits(rows: int, list_width: int, device: torch.device) -> int:
    """Programs per query row: enough for about four waves of the GPU, never more than the list is long."""
    sms = 4 if device.type != "cuda" else sm_count(device)
    return max(1, min(list_width, next_power_of_2(cdiv(4 * sms, rows)), 64))


def triton_sparse_decode(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    kv_num_blocks: Tensor,
    kv_indices: Tensor,
    block_size: int,
    *,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """Attention of one query row per head over the kept key blocks, reading nothing else of the cache.

    Args:
        query: ``[B, H, 1, E]``; key, value ``[B, KVH, Lk, E]`` (``H % KVH == 0``, GQA needs ``enable_gqa``).
        kv_num_blocks: int32 ``[Bp, Hp, 1]``, kv_indices ``[Bp, Hp, 1, K]``: the kept key blocks of the row
            (``Bp``/``Hp`` 1 to broadcast); every key of a kept block is attended (subject to ``attn_mask``).
        block_size: tokens per key block (a power of two >= 16).
        attn_mask: bool (``True`` = attend) or float (added), broadcastable to ``[B, H, 1, Lk]``.
        scale: score scale, ``1 / sqrt(E)`` when ``None``.

    Returns:
        ``[B, H, 1, E]`` in ``query.dtype``; a row that keeps no key gives zeros.
    """
    batch, heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    if q_len != 1:
        raise ValueError(f"the decode kernel takes one query row, got {q_len}")
    if key.shape != value.shape or key.shape[0] != batch or key.shape[-1] != head_dim:
        raise ValueError(f"key {tuple(key.shape)} / value {tuple(value.shape)} do not fit query {tuple(query.shape)}")
    check_heads(heads, kv_heads, enable_gqa)
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    counts = kv_num_blocks.expand(batch, heads, 1)[..., 0]
    indices = kv_indices.expand(batch, heads, 1, kv_indices.shape[-1])[:, :, 0]
    mask, mask_strides, mask_is_bool = query, (0, 0, 0), False
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            raise ValueError(f"attn_mask must be bool or {query.dtype}, got {attn_mask.dtype}")
        mask = attn_mask.expand(batch, heads, 1, kv_len)[:, :, 0]
        mask_strides, mask_is_bool = mask.stride(), attn_mask.dtype == torch.bool

    group = heads // kv_heads
    num_blocks = cdiv(kv_len, block_size)
    rows = batch * kv_heads
    splits = decode_splits(rows, num_blocks, query.device)
    block_d = max(16, next_power_of_2(head_dim))
    part_max = query.new_empty((batch * heads, splits), dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    part_acc = query.new_empty((batch * heads, splits, block_d), dtype=torch.float32)
    sparse_decode_partials[(rows, splits)](
        query, key, value, counts, indices, mask, part_max, part_sum, part_acc,
        query.stride(0), query.stride(1), query.stride(3), *key.stride(), *value.stride(), *counts.stride(),
        *indices.stride(), *mask_strides, heads, kv_heads, group, kv_len, num_blocks, splits,
        softmax_scale(scale, head_dim),
        HEAD_DIM=head_dim, BLOCK_D=block_d, PLAN_BLOCK=block_size, BLOCK_N=min(block_size, 64),
        GROUP_PAD=max(16, next_power_of_2(group)), SEARCH_STEPS=indices.shape[-1].bit_length(),
        HAS_MASK=attn_mask is not None, MASK_IS_BOOL=mask_is_bool,
        num_warps=1 if interpreting() else 4, num_stages=1 if interpreting() else 3, **dot_options(query.dtype),
    )
    out = query.new_empty((batch, heads, 1, head_dim))
    merge_decode_partials[(batch * heads,)](
        part_max, part_sum, part_acc, out, splits, HEAD_DIM=head_dim, BLOCK_D=block_d,
        SPLITS=next_power_of_2(splits), num_warps=1 if interpreting() else 4,
    )
    return out


def merge_partials(part_max: Tensor, part_sum: Tensor, part_acc: Tensor) -> Tensor:
    """Combine split softmax partials (base-2 maxima ``[R, S]``, sums ``[R, S]``, accumulators ``[R, S, E]``)
    into ``[R, E]``; rows with no key give zeros. The PyTorch reference of :func:`merge_decode_partials`."""
    top = part_max.amax(-1, keepdim=True)
    weight = torch.exp2(part_max - top.masked_fill(top == float("-inf"), 0.0))  # empty splits weigh 0
    total = (part_sum * weight).sum(-1, keepdim=True)
    return (part_acc * weight[..., None]).sum(-2) / total.clamp_min(torch.finfo(torch.float32).tiny)
