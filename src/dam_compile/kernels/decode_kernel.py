"""Block-sparse decode: one query row per (batch, head) against a long KV cache, reading only kept key blocks.

A decode step is bound by memory traffic, not by matrix units. So each KV head's key blocks are read once for
all the query heads that share it (GQA): a program takes the group's query rows as one tile, reads each key
block that any of their lists keeps, and scores each row only on the blocks its own list keeps. One program per
KV head gives far too few for the GPU, so, as in FlashDecoding, the key blocks are split across ``splits``
programs; each writes a partial softmax per query row (running max, sum, weighted values), and the last of a
KV head's programs to finish merges them (a counter per KV head, instead of a second launch: a step of 10% of
a 128K cache moves 53 MB, 13 us at copy bandwidth, and a launch costs about 3). Nothing is read back to the host
(the call can be captured in a CUDA graph).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime import driver

from .constants import LOG2E
from .launch_cache import CachedLaunch, LaunchCache, tensors_key
from .common import cdiv, dot_options, interpreting, next_power_of_2, sm_count, softmax_scale
from dam_compile.plan.reference import check_heads
from .stream_buffers import COUNTERS


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _log2_of_power_of_two(x):
    """Exact ``log2`` of a power of two below ``2**32`` (int64): the exponent field of its float32 value."""
    return ((x.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127).to(tl.int64)


@triton.jit
def _merge_rows(PartMax, PartSum, PartAcc, Out, first_row, n_rows, splits,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, SPLIT_CHUNK: tl.constexpr):
    """``Out[first_row + r, :HEAD_DIM]`` for ``r < n_rows <= ROWS`` from the rows' ``splits`` partials (as
    :func:`merge_partials`): all rows at once, ``SPLIT_CHUNK`` splits at a time in one pass (a running maximum
    rescales what was summed), so the merge costs a few dependent reads, not two per row. Partials are read
    from L2 (``.cg``): other CTAs wrote them."""
    offs_r = tl.arange(0, ROWS)
    r_ok = offs_r < n_rows
    rows = first_row + offs_r
    offs_s = tl.arange(0, SPLIT_CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    top = tl.full([ROWS], float("-inf"), tl.float32)
    total = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    for start in range(0, splits, SPLIT_CHUNK):
        part = rows[:, None] * splits + start + offs_s[None, :]
        ok = r_ok[:, None] & (start + offs_s < splits)[None, :]
        part_max = tl.load(PartMax + part, mask=ok, other=float("-inf"), cache_modifier=".cg")
        part_sum = tl.load(PartSum + part, mask=ok, other=0.0, cache_modifier=".cg")
        part_acc = tl.load(PartAcc + part[:, :, None] * BLOCK_D + offs_d[None, None, :], mask=ok[:, :, None],
                           other=0.0, cache_modifier=".cg")
        new_top = tl.maximum(top, tl.max(part_max, axis=1))
        safe = tl.where(new_top == float("-inf"), 0.0, new_top)  # no key yet: every weight 0
        rescale = tl.exp2(top - safe)
        weight = tl.exp2(part_max - safe[:, None])  # empty splits weigh 0
        total = total * rescale + tl.sum(part_sum * weight, axis=1)
        acc = acc * rescale[:, None] + tl.sum(part_acc * weight[:, :, None], axis=1)
        top = new_top
    out = acc / tl.maximum(total, 1.1754943508222875e-38)[:, None]
    tl.store(Out + rows[:, None] * HEAD_DIM + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=r_ok[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def sparse_decode(
    Q, K, V, Counts, Indices, Mask, Partials, Out, Arrivals,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_cb, stride_ch,
    stride_ib, stride_ih, stride_ik,
    stride_mb, stride_mh, stride_mn,
    heads, kv_heads, group, kv_len, list_len, splits, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PLAN_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUP_PAD: tl.constexpr, GROUP_LIST: tl.constexpr, LIST_CHUNK: tl.constexpr, RANGE: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Program ``(b * kv_heads + kvh, split)``: softmax partials of the ``group`` query rows that share KV head
    ``kvh`` over key blocks ``split, split + splits, split + 2 * splits, ...`` (at most ``RANGE`` <= 32 of
    them: strided, so a run of kept blocks, a local window, is spread over the splits). A block is read once for
    the whole group (``GROUP_PAD`` rows in one ``tl.dot``) when any row's list ``Indices[b, h, :Counts[b, h]]``
    keeps it, and each row's scores count only where its own list does. The last program of a ``(b, kvh)`` to
    finish (``Arrivals[b * kv_heads + kvh]``, zero at launch and zeroed again by it) merges the group's
    partials into ``Out`` ``[B*H, HEAD_DIM]``: no second launch.

    Which blocks each row keeps is worked out before any K/V is read, from the rows' whole lists
    (``list_len`` entries each, ``LIST_CHUNK`` at a time, loaded beside the counts rather than after them): the
    split's entries set bits of a word per row, and their OR says which blocks to read. ``Partials``: float32,
    the maxima and the sums ``[B*H, splits]`` each (base-2 logits), then the accumulators
    ``[B*H, splits, BLOCK_D]``."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    b = (row // kv_heads).to(tl.int64)  # offsets of a long cache pass 2**31
    kvh = (row % kv_heads).to(tl.int64)

    # The split's kept blocks per row, as bits (entries are trusted: unique, ascending, in [0, num_blocks)).
    offs_r = tl.arange(0, GROUP_LIST)
    r_ok = offs_r < group
    count = tl.load(Counts + b * stride_cb + (kvh * group + offs_r) * stride_ch, mask=r_ok, other=0)
    lists = Indices + b * stride_ib + (kvh * group + offs_r) * stride_ih
    # What the split takes if every row keeps the same blocks: the first row's entries at list positions
    # split, split + splits, ... (loaded beside the lists, not after them).
    offs_j = tl.arange(0, RANGE)
    rank_pos = split + offs_j * splits
    rank_blocks = tl.load(Indices + b * stride_ib + kvh * group * stride_ih + rank_pos * stride_ik,
                          mask=rank_pos < list_len, other=0)
    first_count = tl.sum(tl.where(offs_r == 0, count, 0), axis=0)
    shared = tl.max(tl.where(r_ok, count, first_count), axis=0) == tl.min(tl.where(r_ok, count, first_count), axis=0)
    list_bits = tl.zeros([GROUP_LIST], tl.int64)
    offs_c = tl.arange(0, LIST_CHUNK)
    for start in range(0, list_len, LIST_CHUNK):
        pos = start + offs_c
        entry = tl.load(lists[:, None] + pos[None, :] * stride_ik, mask=r_ok[:, None] & (pos[None, :] < list_len),
                        other=0)
        valid = pos[None, :] < count[:, None]
        first_row = tl.sum(tl.where(offs_r[:, None] == 0, entry, 0), axis=0)
        shared = shared & (tl.sum((valid & (entry != first_row[None, :])).to(tl.int32)) == 0)
        mine = valid & (entry % splits == split)
        shift = tl.where(mine, entry // splits, 0).to(tl.int64)
        list_bits += tl.sum(tl.where(mine, tl.full([GROUP_LIST, LIST_CHUNK], 1, tl.int64) << shift, 0), axis=1)
    # Rows that keep one list (MHA, or a plan made per KV head): split by rank in it, so every split gets the same
    # number of blocks (splits by block id leave the busiest split with about 2.6x the mean at 10% of 1024 random
    # blocks); else block j of the split is block split + j * splits.
    rank_word = tl.sum(tl.where(rank_pos < first_count, tl.full([RANGE], 1, tl.int64) << offs_j, 0), axis=0)
    list_bits = tl.where(shared, tl.where(r_ok, rank_word, 0), list_bits)
    blocks = tl.where(shared, rank_blocks, split + offs_j * splits)
    any_bits = tl.reduce(list_bits, 0, _bit_or)
    offs_g = tl.arange(0, GROUP_PAD)
    g_ok = offs_g < group
    row_bits = tl.sum(tl.where(offs_g[:, None] == offs_r[None, :], list_bits[None, :], 0), axis=1)  # dot rows
    h = kvh * group + offs_g  # the group's query heads

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
        block = tl.sum(tl.where(offs_j == j, blocks, 0), axis=0)
        offs_n = block.to(tl.int64) * PLAN_BLOCK + sub * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: long caches
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
    n_part = tl.num_programs(0) * group * splits
    PartMax, PartSum, PartAcc = Partials, Partials + n_part, Partials + 2 * n_part
    part = (b * heads + h) * splits + split
    tl.store(PartMax + part, m_i, mask=g_ok)
    tl.store(PartSum + part, l_i, mask=g_ok)
    tl.store(PartAcc + part[:, None] * BLOCK_D + offs_d[None, :], acc, mask=g_ok[:, None])
    # Every thread's stores come before the arrival (a CTA barrier, then the atomic's release at GPU scope); the
    # last program's acquire makes all the group's partials visible to its reads.
    tl.debug_barrier()
    if tl.atomic_add(Arrivals + row, 1) == splits - 1:
        tl.atomic_xchg(Arrivals + row, 0)  # ready for the next launch (launches on a stream never overlap)
        _merge_rows(PartMax, PartSum, PartAcc, Out, b * heads + kvh * group, group, splits, HEAD_DIM, BLOCK_D,
                    GROUP_LIST, SPLIT_CHUNK)


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
    kept = None if cache_key is None else _DECODES.get(cache_key)
    if kept is not None:
        return _launch_kept(kept, query, key, value, kv_num_blocks, kv_indices, attn_mask)
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
    group_list = next_power_of_2(group)
    buffers = _Buffers(batch * heads * splits * (2 + block_d), (batch, heads, 1, head_dim), rows)
    partials, out = buffers.allocate(query)
    strides = dict(zip(_STRIDE_NAMES, (query.stride(0), query.stride(1), query.stride(3), *key.stride(),
                                       *value.stride(), *counts.stride(), *indices.stride(), *mask_strides)))
    _DECODES.launch(cache_key, (rows, splits), dict(
        Q=query, K=key, V=value, Counts=counts, Indices=indices, Mask=mask, Partials=partials, Out=out,
        Arrivals=buffers.arrivals(query), **strides, heads=heads, kv_heads=kv_heads, group=group, kv_len=kv_len,
        list_len=indices.shape[-1], splits=splits, scale=float(softmax_scale(scale, head_dim)),
        HEAD_DIM=head_dim, BLOCK_D=block_d, PLAN_BLOCK=block_size, BLOCK_N=min(block_size, TILE_KEYS),
        GROUP_PAD=max(16, group_list), GROUP_LIST=group_list,
        LIST_CHUNK=min(next_power_of_2(indices.shape[-1]), max(16, _LIST_TILE // group_list)),
        RANGE=next_power_of_2(cdiv(num_blocks, splits)),
        SPLIT_CHUNK=max(1, min(next_power_of_2(splits), _MERGE_TILE // (group_list * block_d))),
        HAS_MASK=attn_mask is not None, MASK_IS_BOOL=mask_is_bool,
        num_warps=1 if interpreting() else 4, num_stages=1 if interpreting() else STAGES, **dot_options(query.dtype),
    ), extra=buffers)
    return out


_LIST_TILE = 2048  # list entries a program loads at once (16 registers a thread at 4 warps)
_MERGE_TILE = 16384  # partial accumulator values the merging program reads at once (one chunk at 32 splits)
TILE_KEYS = 64  # keys per loop step
STAGES = 3  # loop steps in flight
_STRIDE_NAMES = ("stride_qb", "stride_qh", "stride_qd", "stride_kb", "stride_kh", "stride_kn", "stride_kd",
                 "stride_vb", "stride_vh", "stride_vn", "stride_vd", "stride_cb", "stride_ch", "stride_ib",
                 "stride_ih", "stride_ik", "stride_mb", "stride_mh", "stride_mn")
# Repeat decode steps of one site (same shapes, strides and flags; new tensors) skip the checks and Triton's
# binder: a decode step without CUDA graphs is mostly host time.
_DECODES = LaunchCache(sparse_decode, ("Q", "K", "V", "Counts", "Indices", "Mask", "Partials", "Out", "Arrivals"))


class _Buffers(NamedTuple):
    """What a call allocates or borrows: its split partials (elements), its output's shape, its arrival
    counters (one per batch x KV head)."""

    partials: int
    out: tuple[int, ...]
    rows: int

    def allocate(self, query: Tensor) -> tuple[Tensor, Tensor]:
        return query.new_empty(self.partials, dtype=torch.float32), query.new_empty(self.out)

    def arrivals(self, query: Tensor) -> Tensor:
        if not query.is_cuda:  # the CPU interpreter (tests): a counter per call
            return torch.zeros(self.rows, dtype=torch.int32)
        device = query.get_device()
        return COUNTERS.get(device, driver.active.get_current_stream(device), self.rows)


def _call_key(query: Tensor, key: Tensor, value: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor,
              block_size: int, attn_mask: Tensor | None, scale: float | None, enable_gqa: bool) -> tuple | None:
    """What fixes a CUDA call's checks, compiled kernel and every argument but its tensors' addresses (see
    :mod:`.launch_cache`); ``None`` off CUDA or when a tensor is not 16-byte aligned."""
    device = query.get_device()
    if device < 0:
        return None
    tensors = (query, key, value, kv_num_blocks, kv_indices) + (() if attn_mask is None else (attn_mask,))
    per_tensor = tensors_key(*tensors)
    return None if per_tensor is None else (device, block_size, scale, enable_gqa, per_tensor)


def _launch_kept(decode: CachedLaunch, query: Tensor, key: Tensor, value: Tensor, kv_num_blocks: Tensor,
                 kv_indices: Tensor, attn_mask: Tensor | None) -> Tensor:
    """A repeat call through the kept launch: new buffers, this call's tensors (the plan's and the mask's
    expanded views start at their tensors' addresses, so the tensors themselves are passed)."""
    partials, out = decode.extra.allocate(query)
    device = query.get_device()
    stream = driver.active.get_current_stream(device)
    decode(query, key, value, kv_num_blocks, kv_indices, query if attn_mask is None else attn_mask, partials, out,
           COUNTERS.get(device, stream, decode.extra.rows), stream=stream)
    return out


def merge_partials(part_max: Tensor, part_sum: Tensor, part_acc: Tensor) -> Tensor:
    """Combine split softmax partials (base-2 maxima ``[R, S]``, sums ``[R, S]``, accumulators ``[R, S, E]``)
    into ``[R, E]``; rows with no key give zeros. The PyTorch reference of the kernel's merge (:func:`_merge_rows`)."""
    top = part_max.amax(-1, keepdim=True)
    weight = torch.exp2(part_max - top.masked_fill(top == float("-inf"), 0.0))  # empty splits weigh 0
    total = (part_sum * weight).sum(-1, keepdim=True)
    return (part_acc * weight[..., None]).sum(-2) / total.clamp_min(torch.finfo(torch.float32).tiny)
