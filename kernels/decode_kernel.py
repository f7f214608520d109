"""Block-sparse decode: one query row per (batch, head) against a long KV cache, reading only kept key blocks.

A decode step is bound by memory traffic, not by matrix units. So each KV head's key blocks are read once for
all the query heads that share it (GQA): a program takes the group's query rows as one tile, reads each key
block that any of their lists keeps, and scores each row only on the blocks its own list keeps. One program per
KV head gives far too few for the GPU, so, as in FlashDecoding, the key blocks are split across ``splits``
programs; each writes a partial softmax per query row (running max, sum, weighted values), and one more launch
merges them. Nothing is read back to the host (the call can be captured in a CUDA graph).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .constants import LOG2E
from .block_sparse_launch import dot_options
from .launch_cache import CachedLaunch, LaunchCache, tensors_key
from .launch_common import cdiv, interpreting, next_power_of_2, sm_count, softmax_scale
from .reference import check_heads


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _log2_of_power_of_two(x):
    """Exact ``log2`` of a power of two below ``2**32`` (int64): the exponent field of its float32 value."""
    return ((x.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127).to(tl.int64)


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
    GROUP_PAD: tl.constexpr, RANGE: tl.constexpr, CHUNK: tl.constexpr, HAS_MASK: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Program ``(b * kv_heads + kvh, split)``: softmax partials of the ``group`` query rows that share KV head
    ``kvh`` over the split's range of at most ``RANGE`` (<= 32) key blocks. A block is read once for the whole
    group (``GROUP_PAD`` rows in one ``tl.dot``) when any row's list ``Indices[b, h, :Counts[b, h]]`` (ascending,
    unique) keeps it, and each row's scores count only where its own list does.

    Which blocks of the range each row keeps is worked out before any K/V is read, with no chain of dependent
    loads: the row's entries before the range are counted ``CHUNK`` at a time (independent loads), the next
    ``RANGE`` entries loaded at once, and those inside the range set bits of a word per row; their OR says which
    blocks to read. Partials: ``PartMax``/``PartSum`` ``[B*H, splits]`` (base-2 logits),
    ``PartAcc`` ``[B*H, splits, BLOCK_D]``."""
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
    count = tl.load(Counts + b * stride_cb + h * stride_ch, mask=g_ok, other=0)
    lists = Indices + b * stride_ib + h * stride_ih
    # Entries before the range: at most `first` of them (entry p of an ascending unique list is >= p).
    before = tl.zeros([GROUP_PAD], tl.int32)
    offs_c = tl.arange(0, CHUNK)
    for start in range(0, tl.minimum(first, tl.max(count, axis=0)), CHUNK):
        pos = start + offs_c
        entry = tl.load(lists[:, None] + pos[None, :] * stride_ik, mask=pos[None, :] < count[:, None], other=first)
        before += tl.sum((entry < first).to(tl.int32), axis=1)
    pos = before[:, None] + tl.arange(0, RANGE)[None, :]
    entry = tl.load(lists[:, None] + pos * stride_ik, mask=pos < count[:, None], other=last)
    inside = entry < last
    shift = tl.where(inside, entry - first, 0).to(tl.int64)
    row_bits = tl.sum(tl.where(inside, tl.full([GROUP_PAD, RANGE], 1, tl.int64) << shift, 0), axis=1)
    any_bits = tl.reduce(row_bits, 0, _bit_or)

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    qk_scale = scale * LOG2E
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], dtype=tl.float32)
    # One loop step per BLOCK_N keys of each block to read, in ascending order: the step's block is the lowest
    # bit left in `todo`. Its address comes from registers, not from a load, so the loop pipelines: the next
    # steps' K/V are in flight while this one computes (`num_stages`).
    SUB: tl.constexpr = PLAN_BLOCK // BLOCK_N
    n_read = tl.sum(((any_bits >> tl.arange(0, RANGE)) & 1).to(tl.int32), axis=0)
    todo = any_bits
    for step in range(0, n_read * SUB):
        lowest = todo & -todo
        j = _log2_of_power_of_two(lowest)
        member = ((row_bits >> j) & 1) != 0
        sub = step % SUB
        offs_n = (first + j).to(tl.int64) * PLAN_BLOCK + sub * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: long caches
        n_ok = offs_n < kv_len
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
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
        todo = tl.where(sub == SUB - 1, todo ^ lowest, todo)
    out = (b * heads + h) * splits + split
    tl.store(PartMax + out, m_i, mask=g_ok)
    tl.store(PartSum + out, l_i, mask=g_ok)
    tl.store(PartAcc + out[:, None] * BLOCK_D + offs_d[None, :], acc, mask=g_ok[:, None])


@triton.jit
def merge_decode_partials(
    PartMax, PartSum, PartAcc, Out, splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_CHUNK: tl.constexpr,
):
    """Program ``row``: ``Out[row, :HEAD_DIM]`` from the row's ``splits`` partials (as :func:`merge_partials`,
    in one launch instead of a chain of PyTorch ops: a decode step's host time is its cost without CUDA graphs),
    ``SPLIT_CHUNK`` (a power of two) splits at a time: the maximum first, then the weighted sums."""
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, SPLIT_CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    top = float("-inf")
    for start in range(0, splits, SPLIT_CHUNK):
        part_max = tl.load(PartMax + row * splits + start + offs_s, mask=start + offs_s < splits, other=float("-inf"))
        top = tl.maximum(top, tl.max(part_max, axis=0))
    top = tl.where(top == float("-inf"), 0.0, top)  # a row with no key: every weight 0
    total = 0.0
    acc = tl.zeros([BLOCK_D], tl.float32)
    for start in range(0, splits, SPLIT_CHUNK):
        in_row = start + offs_s < splits
        part = row * splits + start + offs_s
        weight = tl.exp2(tl.load(PartMax + part, mask=in_row, other=float("-inf")) - top)  # empty splits weigh 0
        total += tl.sum(tl.load(PartSum + part, mask=in_row, other=0.0) * weight, axis=0)
        part_acc = tl.load(PartAcc + part[:, None] * BLOCK_D + offs_d[None, :], mask=in_row[:, None], other=0.0)
        acc += tl.sum(part_acc * weight[:, None], axis=0)
    out = acc / tl.maximum(total, 1.1754943508222875e-38)
    tl.store(Out + row * HEAD_DIM + offs_d, out.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM)


MAX_SPLIT_BLOCKS = 32  # key blocks per split: one bit each of a word, exact through float32 (int64 words)


def decode_splits(rows: int, num_blocks: int, device: torch.device) -> int:
    """Programs per ``(batch, KV head)`` row: blocks split evenly so that the ``rows`` rows' programs fill the
    GPU about once at two per SM (H200, 128K and 32K KV: as fast as 4x fewer blocks each, and 10-15% faster
    dense than four waves), at most :data:`MAX_SPLIT_BLOCKS` blocks each."""
    sms = 4 if device.type != "cuda" else sm_count(device)
    per_split = min(MAX_SPLIT_BLOCKS, cdiv(num_blocks * rows, 2 * sms))
    return cdiv(num_blocks, per_split)


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
    cache_key = _call_key(query, key, value, kv_num_blocks, kv_indices, block_size, attn_mask, scale, enable_gqa)
    kept = None if cache_key is None else (_PARTIALS.get(cache_key), _MERGES.get(cache_key))
    if kept is not None and None not in kept:
        return _launch_kept(*kept, query, key, value, kv_num_blocks, kv_indices, attn_mask)
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
    buffers = _Buffers((batch * heads, splits), (batch * heads, splits, block_d), (batch, heads, 1, head_dim))
    part_max, part_sum, part_acc, out = buffers.allocate(query)
    strides = dict(zip(_STRIDE_NAMES, (query.stride(0), query.stride(1), query.stride(3), *key.stride(),
                                       *value.stride(), *counts.stride(), *indices.stride(), *mask_strides)))
    _PARTIALS.launch(cache_key, (rows, splits), dict(
        Q=query, K=key, V=value, Counts=counts, Indices=indices, Mask=mask, PartMax=part_max, PartSum=part_sum,
        PartAcc=part_acc, **strides, heads=heads, kv_heads=kv_heads, group=group, kv_len=kv_len,
        num_blocks=num_blocks, splits=splits, scale=softmax_scale(scale, head_dim),
        HEAD_DIM=head_dim, BLOCK_D=block_d, PLAN_BLOCK=block_size, BLOCK_N=min(block_size, 64),
        GROUP_PAD=max(16, next_power_of_2(group)), RANGE=next_power_of_2(cdiv(num_blocks, splits)), CHUNK=64,
        HAS_MASK=attn_mask is not None, MASK_IS_BOOL=mask_is_bool,
        num_warps=1 if interpreting() else 4, num_stages=1 if interpreting() else 3, **dot_options(query.dtype),
    ), extra=buffers)
    _MERGES.launch(cache_key, (batch * heads,), dict(
        PartMax=part_max, PartSum=part_sum, PartAcc=part_acc, Out=out, splits=splits, HEAD_DIM=head_dim,
        BLOCK_D=block_d, SPLIT_CHUNK=min(next_power_of_2(splits), 32), num_warps=1 if interpreting() else 4,
    ))
    return out


_STRIDE_NAMES = ("stride_qb", "stride_qh", "stride_qd", "stride_kb", "stride_kh", "stride_kn", "stride_kd",
                 "stride_vb", "stride_vh", "stride_vn", "stride_vd", "stride_cb", "stride_ch", "stride_ib",
                 "stride_ih", "stride_ik", "stride_mb", "stride_mh", "stride_mn")
# Repeat decode steps of one site (same shapes, strides and flags; new tensors) skip the checks and Triton's
# binder: a decode step without CUDA graphs is mostly host time.
_PARTIALS = LaunchCache(sparse_decode_partials, ("Q", "K", "V", "Counts", "Indices", "Mask", "PartMax", "PartSum",
                                                 "PartAcc"))
_MERGES = LaunchCache(merge_decode_partials, ("PartMax", "PartSum", "PartAcc", "Out"))


class _Buffers(NamedTuple):
    """Shapes of a call's split partials (maxima and sums, accumulators) and output."""

    part_stats: tuple[int, ...]
    part_acc: tuple[int, ...]
    out: tuple[int, ...]

    def allocate(self, query: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return (query.new_empty(self.part_stats, dtype=torch.float32),
                query.new_empty(self.part_stats, dtype=torch.float32),
                query.new_empty(self.part_acc, dtype=torch.float32), query.new_empty(self.out))


def _call_key(query: Tensor, key: Tensor, value: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor,
              block_size: int, attn_mask: Tensor | None, scale: float | None, enable_gqa: bool) -> tuple | None:
    """What fixes a CUDA call's checks, compiled kernels and every argument but its tensors' addresses (see
    :mod:`.launch_cache`); ``None`` off CUDA or when a tensor is not 16-byte aligned."""
    if not query.is_cuda:
        return None
    tensors = (query, key, value, kv_num_blocks, kv_indices) + (() if attn_mask is None else (attn_mask,))
    per_tensor = tensors_key(*tensors)
    return None if per_tensor is None else (block_size, scale, enable_gqa, per_tensor)


def _launch_kept(partials: CachedLaunch, merge: CachedLaunch, query: Tensor, key: Tensor, value: Tensor,
                 kv_num_blocks: Tensor, kv_indices: Tensor, attn_mask: Tensor | None) -> Tensor:
    """A repeat call through the kept launches: new buffers, this call's tensors (the plan's and the mask's
    expanded views start at their tensors' addresses, so the tensors themselves are passed)."""
    part_max, part_sum, part_acc, out = partials.extra.allocate(query)
    partials(query, key, value, kv_num_blocks, kv_indices, query if attn_mask is None else attn_mask, part_max,
             part_sum, part_acc)
    merge(part_max, part_sum, part_acc, out)
    return out


def merge_partials(part_max: Tensor, part_sum: Tensor, part_acc: Tensor) -> Tensor:
    """Combine split softmax partials (base-2 maxima ``[R, S]``, sums ``[R, S]``, accumulators ``[R, S, E]``)
    into ``[R, E]``; rows with no key give zeros. The PyTorch reference of :func:`merge_decode_partials`."""
    top = part_max.amax(-1, keepdim=True)
    weight = torch.exp2(part_max - top.masked_fill(top == float("-inf"), 0.0))  # empty splits weigh 0
    total = (part_sum * weight).sum(-1, keepdim=True)
    return (part_acc * weight[..., None]).sum(-2) / total.clamp_min(torch.finfo(torch.float32).tiny)
