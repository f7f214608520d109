"""Expand DAM head patterns (diagonals, columns, true-mask corner) into a block-sparse plan for a run length.

A key block is kept for a query block when some pair of the two blocks is allowed by the extended mask; it is
*full* (seen whole, no per-token test) only when every pair is allowed and causally visible, otherwise
*partial*, where the kernel applies the token-exact pattern. Both tests are exact on whole blocks and stay
correct when the last blocks are ragged, so a plan built for a length rounded up to whole blocks serves every
length in that bucket (see :func:`cached_pattern_plan`).

Everything is computed from prefix counts of the pattern bitmaps: ``O(H * Mq * Nk)``, never per token pair.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor

from .block_plan import BlockSparsePlan, num_blocks
from .structured_plans import block_token_ranges, causal_block_tables
from .token_pattern import pattern_bitmaps


def _prefix(bits: Tensor) -> Tensor:
    """Exclusive prefix counts along the last dim: ``out[..., t] = bits[..., :t].sum()``, one longer."""
    counts = bits.to(torch.int32).cumsum(-1)
    return torch.nn.functional.pad(counts, (1, 0))


def _range_count(prefix: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """Set bits in ``[low, high]`` (inclusive; empty when ``low > high``) per head: ``[H, *low.shape]``."""
    size = prefix.shape[-1] - 1
    lo = low.clamp(0, size)
    hi = (high + 1).clamp(0, size)
    hi = torch.maximum(hi, lo)
    flat_lo, flat_hi = lo.reshape(-1), hi.reshape(-1)
    counts = prefix[:, flat_hi] - prefix[:, flat_lo]
    return counts.reshape(prefix.shape[0], *low.shape)


def pattern_block_tables(
    diagonals: Tensor,
    columns: Tensor,
    corner: Tensor | None,
    q_len: int,
    kv_len: int,
    block_size: int,
    is_causal: bool,
    q_offset: int = 0,
) -> tuple[Tensor, Tensor]:
    """Boolean ``(partial, full)`` tables ``[1, H, Mq, Nk]`` for the extended mask of the patterns.

    ``diagonals [H, R]`` / ``columns [H, C]``: padded sorted lists (the plan's token-pattern format);
    ``corner``: bool ``[H, P, P]`` or ``None``."""
    device = diagonals.device
    mq, nk = num_blocks(q_len, block_size), num_blocks(kv_len, block_size)
    diag_bits, col_bits = pattern_bitmaps(diagonals, columns, q_len, kv_len, q_offset)
    diag_prefix, col_prefix = _prefix(diag_bits), _prefix(col_bits)

    # Token ranges of each block pair: query positions [i_lo, i_hi], keys [j_lo, j_hi] (ragged ends clipped).
    i_lo, i_hi, j_lo, j_hi = block_token_ranges(q_len, kv_len, block_size, device, q_offset=q_offset)
    i_lo, i_hi, j_lo, j_hi = i_lo[:, None], i_hi[:, None], j_lo[None, :], j_hi[None, :]

    # Offsets i - j of a block pair form the contiguous range [i_lo - j_hi, i_hi - j_lo]; the diagonal table
    # is indexed by offset + kv_len - 1.
    shift = kv_len - 1
    off_lo, off_hi = i_lo - j_hi, i_hi - j_lo
    seen_lo = off_lo.clamp(min=0) if is_causal else off_lo
    diag_any = _range_count(diag_prefix, seen_lo + shift, off_hi + shift) > 0
    diag_all = _range_count(diag_prefix, off_lo + shift, off_hi + shift) == (off_hi - off_lo + 1)
    seen_hi = torch.minimum(j_hi, i_hi) if is_causal else j_hi.expand(mq, nk)
    col_any = _range_count(col_prefix, j_lo.expand(mq, nk), seen_hi) > 0
    col_all = _range_count(col_prefix, j_lo.expand(mq, nk), j_hi.expand(mq, nk)) == (j_hi - j_lo + 1)

    visible, whole = causal_block_tables(q_len, kv_len, block_size, is_causal, device, q_offset=q_offset)
    kept = diag_any | col_any
    full = diag_all | col_all
    if corner is not None:
        kept, full = _with_corner(corner, kept, full, i_lo, i_hi, j_lo, j_hi)
    kept = kept & visible
    full = kept & full & whole
    return (kept & ~full)[None], full[None]


def _with_corner(corner, kept, full, i_lo, i_hi, j_lo, j_hi) -> tuple[Tensor, Tensor]:
    """Inside the corner the true mask decides: a pair of blocks touching it is kept if the corner keeps a
    pair there (the pattern may still keep pairs outside), full only if the corner keeps all of its part."""
    pcl = corner.shape[-1]
    integral = torch.nn.functional.pad(corner.to(torch.int32).cumsum(-1).cumsum(-2), (1, 0, 1, 0))
    r0, r1 = i_lo.clamp(max=pcl), (i_hi + 1).clamp(max=pcl)
    c0, c1 = j_lo.clamp(max=pcl), (j_hi + 1).clamp(max=pcl)
    r0, r1, c0, c1 = (t.expand(kept.shape[-2:]) for t in (r0, r1, c0, c1))
    area = (r1 - r0).clamp(min=0) * (c1 - c0).clamp(min=0)
    inside = (integral[:, r1, c1] - integral[:, r0, c1] - integral[:, r1, c0] + integral[:, r0, c0])
    touches = area > 0
    entirely = (i_hi < pcl) & (j_hi < pcl)
    corner_kept = inside > 0
    kept = torch.where(entirely, corner_kept, kept | (touches & corner_kept))
    full = torch.where(touches, (inside == area) & (entirely | full), full)
    return kept, full


def pattern_plan(
    diagonals: Tensor,
    columns: Tensor,
    corner: Tensor | None,
    q_len: int,
    kv_len: int,
    block_size: int,
    is_causal: bool,
    q_offset: int = 0,
) -> BlockSparsePlan:
    """The plan (compact lists, token pattern attached) whose token mask is the extended DAM mask."""
    partial, full = pattern_block_tables(diagonals, columns, corner, q_len, kv_len, block_size, is_causal, q_offset)
    plan = BlockSparsePlan.from_block_tables(partial, block_size, full, compact=True)
    return plan.with_token_pattern(diagonals, columns, corner)


_CACHE: OrderedDict[tuple, BlockSparsePlan] = OrderedDict()
CACHE_SIZE = 256


def cached_pattern_plan(
    diagonals: Tensor,
    columns: Tensor,
    corner: Tensor | None,
    q_len: int,
    kv_len: int,
    block_size: int,
    is_causal: bool,
) -> BlockSparsePlan:
    """:func:`pattern_plan` for top-left aligned queries, built once per (patterns, length bucket): lengths
    are rounded up to whole blocks, which is exact (see the module docstring). Keyed by the pattern tensors'
    storage, version (patterns edited in place are rebuilt) and layout; the plan holds the tensors, so no other tensor
    can take their storage while the entry lives."""
    mq, nk = num_blocks(q_len, block_size), num_blocks(kv_len, block_size)
    tensors = [t for t in (diagonals, columns, corner) if t is not None]
    # Shape and strides too: views of one storage (a tensor-parallel rank's head slice) share a data pointer.
    key = (*((t.data_ptr(), t._version, t.device, tuple(t.shape), t.stride()) for t in tensors), mq, nk, block_size,
           is_causal)
    plan = _CACHE.get(key)
    if plan is None:
        plan = pattern_plan(diagonals, columns, corner, mq * block_size, nk * block_size, block_size, is_causal)
        # The bucket's plan has exactly this run's block grid; only the lengths it was built for differ.
        _CACHE[key] = plan
        if len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return plan


def clear_pattern_plan_cache() -> None:
    """Forget every cached plan (a benchmark timing the first build of a length)."""
    _CACHE.clear()
