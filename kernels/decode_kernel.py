"""Block-sparse decode: one query row per (batch, head) against a long KV cache, reading only kept key blocks.

A decode step is bound by memory traffic, not by matrix units, and one row per head gives far too few programs
for the GPU. So, as in FlashDecoding, each row's kept-block list is split across ``splits`` programs; each
writes a partial softmax (running max, sum, weighted values), and :func:`triton_sparse_decode` merges them.
The split of a list is computed on the device from its count, so nothing is read back to the host (the call
can be captured in a CUDA graph).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .constants import LOG2E
from .launch_common import cdiv, interpreting, next_power_of_2
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
    heads, group, kv_len, splits, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PLAN_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
):
    """Program ``(b * heads + h, split)``: softmax partials of query row ``(b, h)`` over its share of the kept
    blocks ``Indices[b, h, :Counts[b, h]]``. Partials: ``PartMax``/``PartSum`` ``[B*H, splits]`` (base-2
    logits), ``PartAcc`` ``[B*H, splits, BLOCK_D]``."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    b = (row // heads).to(tl.int64)  # offsets of a long cache pass 2**31
    h = (row % heads).to(tl.int64)
    kvh = h // group
    count = tl.load(Counts + b * stride_cb + h * stride_ch)
    per_split = (count + splits - 1) // splits
    first = split * per_split
    last = tl.minimum(first + per_split, count)

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_d * stride_qd, mask=d_ok, other=0.0).to(tl.float32)
    q = q * (scale * LOG2E)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    m_i = tl.full([], float("-inf"), tl.float32)
    l_i = tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(first, last):
        block = tl.load(Indices + b * stride_ib + h * stride_ih + i * stride_ik)
        for sub in tl.static_range(0, PLAN_BLOCK, BLOCK_N):
            offs_n = block.to(tl.int64) * PLAN_BLOCK + sub + tl.arange(0, BLOCK_N)
            n_ok = offs_n < kv_len
            k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            s = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
            if HAS_MASK:
                m_ptr = Mask + b * stride_mb + h * stride_mh + offs_n * stride_mn
                if MASK_IS_BOOL:
                    allowed = tl.load(m_ptr, mask=n_ok, other=0) != 0
                    s = tl.where(allowed, s, float("-inf"))
                else:
                    s = s + tl.load(m_ptr, mask=n_ok, other=0.0).to(tl.float32) * LOG2E
            s = tl.where(n_ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile with no visible key adds nothing
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe)
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
            m_i = m_new
    out = row * splits + split
    tl.store(PartMax + out, m_i)
    tl.store(PartSum + out, l_i)
    tl.store(PartAcc + out * BLOCK_D + offs_d, acc)


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
    sms = 4 if device.type != "cuda" else torch.cuda.get_device_properties(device).multi_processor_count
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

    rows = batch * heads
    splits = decode_splits(rows, max(1, indices.shape[-1]), query.device)
    block_d = max(16, next_power_of_2(head_dim))
    part_max = query.new_empty((rows, splits), dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    part_acc = query.new_empty((rows, splits, block_d), dtype=torch.float32)
    block_n = min(block_size, 64)
    sparse_decode_partials[(rows, splits)](
        query, key, value, counts, indices, mask, part_max, part_sum, part_acc,
        query.stride(0), query.stride(1), query.stride(3),
        *key.stride(), *value.stride(), *counts.stride(), *indices.stride(), *mask_strides,
        heads, heads // kv_heads, kv_len, splits, 1.0 / math.sqrt(head_dim) if scale is None else float(scale),
        HEAD_DIM=head_dim, BLOCK_D=block_d, PLAN_BLOCK=block_size, BLOCK_N=block_n,
        HAS_MASK=attn_mask is not None, MASK_IS_BOOL=mask_is_bool,
        num_warps=1 if interpreting() else 4, num_stages=1 if interpreting() else 3,
    )
    out = query.new_empty((batch, heads, 1, head_dim))
    merge_decode_partials[(rows,)](
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
