"""The adaptive dynamic plan (``estimator="adaptive"``) as five Triton kernels and a few torch ops; its exact-row,
need and list kernels (:func:`exact_rows`, :func:`lists_from_estimate`) also serve the default ``"sampled"``
plan (``kernels/sampled_plan_kernel.py``).

:func:`kernels.dynamic_mask.dynamic_block_plan` is the definition, in plain PyTorch; compiled with Inductor it
ran about 50 kernels, with 2.2 ms of host time per call at 32K and a 47 s compile on first use (H200,
``benchmarks/bench_maskgen.py``). Here the same plan needs no compile step:

1. ``dam::last_rows_block_lse``'s kernel: the exact per-key-block log-sum-exp of the last queries;
2. :func:`_exact_rows_kernel`: their block mass, its mean per key block (the column) and per exact query block,
   and the blocks each exact query needs (``EXACT_ROW_MASS`` of its own attention);
3. block means of Q and K and their product (torch: two reductions and a matmul), the pooled logits;
4. :func:`_estimate_kernel`: each row's estimate (exact rows their mass; per head the pooled softmax or the
   vertical-slash lines, by FlexPrefill's test of the pooled last row against the column), and DAM's
   Box-Cox threshold counted per block diagonal and column (:func:`_threshold_kernel` apart when the map's
   minimum is not known in advance);
5. :func:`_need_kernel`: what each row needs (always-kept, DAM-kept and pattern blocks, then blocks by mass
   until ``mass_target``), as a count and a mass threshold;
6. :func:`_lists_kernel`: the head's mass budgets and each row's chosen blocks (the first ``budget`` of its
   order), as ascending lists.

Where the definition sorts a row, these kernels find the same prefix by bisection on the bits of a float
threshold (non-negative floats order like their bits): no sort, no data-dependent shapes, no host sync, so a
CUDA graph can capture it. Results equal the definition's up to float rounding at a threshold's edge (sums in
another order) and the order of exact ties (broken here by block index).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .block_estimates import ALWAYS_PRIORITY, DAM_PRIORITY, EXACT_ROW_MASS, QUERY_AWARE_JS_DISTANCE, block_sums
from dam_compile.kernels.common import cdiv, next_power_of_2, softmax_scale
from dam_compile.plan.dam_patterns import EPS
from dam_compile.kernels.last_rows_lse import exact_query_rows, kernel_runs, launch_last_rows_block_lse

_EPS = tl.constexpr(EPS)
_INF_BITS = tl.constexpr(0x7F800000)  # +inf as int32 bits: every non-negative float's bits lie below
_PRIORITY_ALWAYS = tl.constexpr(ALWAYS_PRIORITY)
_PRIORITY_DAM = tl.constexpr(DAM_PRIORITY)
TILE_ELEMENTS = 4096  # rows per program x padded key blocks: what a program's registers hold


# ---- shared row helpers -------------------------------------------------------------------------------------

@triton.jit
def row_tile(m0, mq, nk, IS_CAUSAL: tl.constexpr, BM: tl.constexpr, NKP: tl.constexpr):
    """Rows ``m [BM]``, columns ``n [NKP]``, and the visible block pairs ``[BM, NKP]`` (causal: ``n <= m``)."""
    m = m0 + tl.arange(0, BM)
    n = tl.arange(0, NKP)
    inside = (m[:, None] < mq) & (n[None, :] < nk)
    if IS_CAUSAL:
        inside = inside & (n[None, :] <= m[:, None])
    return m, n, inside


@triton.jit
def _box_cox(x, lam, LAM: tl.constexpr):
    """DAM's Box-Cox of ``max(x, 1e-10)`` (``kernels/dam_patterns.box_cox``); ``LAM``: ``"log"`` (lambda 0),
    ``"sqrt"`` (0.5, the default: torch computes that power as a square root too) or ``"pow"``."""
    x = tl.maximum(x, _EPS)
    if LAM == "log":
        return tl.log(x)
    if LAM == "sqrt":
        return (tl.sqrt_rn(x) - 1.0) / lam
    return (tl.exp2(lam * tl.log2(x)) - 1.0) / lam


@triton.jit
def box_cox_low(RowMin, bh, mq, lam, LAM: tl.constexpr, KNOWN_LOW: tl.constexpr, MQP: tl.constexpr):
    """The shift of ``shifted_box_cox``: Box-Cox of the head map's minimum (Box-Cox is increasing), at most 0.
    ``KNOWN_LOW``: the map has invisible (zero) blocks (causal, several key blocks), so the minimum is 0."""
    if KNOWN_LOW:
        return tl.minimum(_box_cox(tl.zeros([MQP], tl.float32), lam, LAM), 0.0).min(axis=0)
    rows = tl.arange(0, MQP)
    row_min = tl.load(RowMin + bh * mq + rows, mask=rows < mq, other=1.0)  # Box-Cox(1) = 0: never below
    return tl.minimum(tl.min(_box_cox(row_min, lam, LAM), axis=0), 0.0)


@triton.jit
def _seen_log(m, n, nk, kv_len, block_size, IS_CAUSAL: tl.constexpr):
    """``[BM, NKP]`` log of the keys a query of block ``m`` sees in key block ``n`` (half a causal diagonal):
    the pooled estimate's prior (``pooled_estimate``'s ``keys_seen``)."""
    count = tl.minimum(kv_len - n * block_size, block_size).to(tl.float32)[None, :]
    if IS_CAUSAL:
        count = tl.where(m[:, None] == n[None, :], (count + 1) / 2, count)
    return tl.log(count)


@triton.jit
def count_threshold(est, visible, m, n, Counts, bh, mq, nk, low, lam, tau, LAM: tl.constexpr):
    """DAM's threshold on the shifted Box-Cox map, counted per block diagonal and per column (integer atomics:
    the counts do not depend on the order)."""
    hit = ((_box_cox(est, lam, LAM) - low) >= tau) & visible
    base = Counts + bh * (mq + 2 * nk - 1)
    tl.atomic_add(base + (m[:, None] - n[None, :] + nk - 1), 1, mask=hit)
    tl.atomic_add(base + mq + nk - 1 + n, tl.sum(hit.to(tl.int32), axis=0), mask=n < nk)


@triton.jit
def _smallest_passing(values, base, target):
    """Per row, the smallest float ``t >= 0`` with ``base + sum(values[values > t]) < target`` (``+inf`` when
    even ``t = inf`` fails): sorted by value, largest first, a block ``j`` has less than ``target`` before it
    exactly when ``values[j] >= t``. ``values [BM, NKP]`` (0 where not a candidate), ``base [BM]``."""
    lo = tl.full(base.shape, -1, tl.int32)  # its predicate taken as false
    hi = tl.full(base.shape, _INF_BITS, tl.int32)
    for _ in range(32):  # the bit range [-1, 2**31) halves 32 times
        active = hi - lo > 1
        mid = lo + (hi - lo) // 2
        t = tl.maximum(mid, 0).to(tl.float32, bitcast=True)
        ok = base + tl.sum(tl.where(values > t[:, None], values, 0.0), axis=1) < target
        hi = tl.where(active & ok, mid, hi)
        lo = tl.where(active & ~ok, mid, lo)
    return tl.where(base < target, hi.to(tl.float32, bitcast=True), float("inf"))


@triton.jit
def _row_order(Est, RowMin, Counts, Known, bh, m0, mq, nk, exact, sink_blocks, local_blocks, lam, tau, mu,
               IS_CAUSAL: tl.constexpr, LAM: tl.constexpr, KNOWN_LOW: tl.constexpr, BM: tl.constexpr,
               NKP: tl.constexpr, MQP: tl.constexpr):
    """A tile's rows as the definition orders them: ``(m, n, visible, est, priority, forced, always)``, where
    ``priority`` is 4 + mass for always-kept blocks, 2 + mass for DAM-kept ones (threshold, whole diagonals
    and columns, blocks the exact rows need), the mass otherwise; ``forced`` marks the first two kinds."""
    m, n, visible = row_tile(m0, mq, nk, IS_CAUSAL, BM, NKP)
    cell = bh * mq * nk + m[:, None] * nk + n[None, :]
    est = tl.load(Est + cell, mask=visible, other=0.0)
    low = box_cox_low(RowMin, bh, mq, lam, LAM, KNOWN_LOW, MQP)
    dam = ((_box_cox(est, lam, LAM) - low) >= tau) & visible
    # Whole block diagonals and columns with at least mu of their visible blocks above the threshold.
    offset = m[:, None] - n[None, :]
    slot = offset + nk - 1
    diag_hits = tl.load(Counts + bh * (mq + 2 * nk - 1) + slot, mask=visible, other=0).to(tl.float32)
    first = tl.maximum(offset, 0)
    last = tl.minimum(mq - 1, nk - 1 + offset)
    diag_size = tl.maximum(last - first + 1, 1)
    if IS_CAUSAL:
        col_size = tl.maximum(mq - n, 1)
    else:
        col_size = tl.zeros_like(n) + mq
    col_hits = tl.load(Counts + bh * (mq + 2 * nk - 1) + mq + nk - 1 + n, mask=n < nk, other=0).to(tl.float32)
    pattern = (diag_hits >= mu * diag_size.to(tl.float32)) | (col_hits >= mu * col_size.to(tl.float32))[None, :]
    # Blocks the exact rows' queries need (the last ``exact`` rows; slot 1 is the last row, 0 the one before).
    known_slot = m - mq + 2
    is_exact = m >= mq - exact
    known = tl.load(Known + (bh * 2 + known_slot[:, None]) * nk + n[None, :],
                    mask=visible & is_exact[:, None], other=0) != 0
    dam = dam | (pattern & visible) | known
    if IS_CAUSAL:
        local = (offset >= 0) & (offset < local_blocks)
    else:
        local = (offset < local_blocks) & (offset > -local_blocks)
    always = visible & ((n[None, :] < sink_blocks) | local)
    priority = tl.where(always, _PRIORITY_ALWAYS, tl.where(dam, _PRIORITY_DAM, 0.0)) + est
    return m, n, visible, est, priority, always | dam, always


@triton.jit
def _needed(visible, est, forced, threshold):
    """The blocks each row needs: forced ones, and by mass those at or above its ``threshold [BM]``."""
    return forced | (visible & (est >= threshold[:, None]))


# ---- kernels ------------------------------------------------------------------------------------------------

@triton.jit
def _row_mass(Lse, bh, r0, rows, nk, BR: tl.constexpr, NKP: tl.constexpr):
    """Rows ``r [BR]`` from ``r0`` and their block mass ``[BR, NKP]`` (each row sums to 1; 0 past the ends)."""
    r = r0 + tl.arange(0, BR)
    n = tl.arange(0, NKP)
    ok = (r[:, None] < rows) & (n[None, :] < nk)
    lse = tl.load(Lse + (bh * rows + r[:, None]) * nk + n[None, :], mask=ok, other=float("-inf"))
    peak = tl.max(lse, axis=1)
    safe = tl.where(peak == float("-inf"), 0.0, peak)
    total = tl.log(tl.sum(tl.exp(lse - safe[:, None]), axis=1)) + safe
    total = tl.where(peak == float("-inf"), 0.0, total)  # rows past the last: no key, no mass
    return r, tl.where(ok, tl.exp(lse - total[:, None]), 0.0)


@triton.jit
def _exact_rows_kernel(
    Lse, Column, GroupMass, Known, rows, last_len, nk, target,
    BR: tl.constexpr, NKP: tl.constexpr,
):
    """Per head, from the last ``rows`` queries' block log-sum-exp ``[rows, nk]`` (queries ``r >= rows -
    last_len`` form the last query block, the others the block before): the union per group of the blocks
    each query needs to reach ``target`` of its own mass (``BR`` queries per program, integer atomics); and,
    in the head's first program, the column mean of their block mass and each group's mean row (summed in
    row order: the same floats every run)."""
    bh, r0 = tl.program_id(0), tl.program_id(1) * BR
    n = tl.arange(0, NKP)
    col_ok = n < nk
    group_ids = tl.arange(0, 2)
    r, mass = _row_mass(Lse, bh, r0, rows, nk, BR, NKP)
    wanted = (mass >= _smallest_passing(mass, tl.zeros([BR], tl.float32), target)[:, None]) & (mass > 0)
    mine = (r >= rows - last_len).to(tl.int32)[None, :] == group_ids[:, None]  # [2, BR]: 1 the last block
    needs = tl.max(tl.where(mine[:, :, None] & wanted[None, :, :], 1, 0), axis=1)
    out = (bh * 2 + group_ids[:, None]) * nk + n[None, :]
    tl.atomic_max(Known + out, needs, mask=col_ok[None, :] & (tl.sum(mine.to(tl.int32), axis=1) > 0)[:, None])
    if r0 == 0:
        column = tl.zeros([NKP], tl.float32)
        sums = tl.zeros([2, NKP], tl.float32)
        for start in range(0, rows, BR):
            r, mass = _row_mass(Lse, bh, start, rows, nk, BR, NKP)
            mine = (r >= rows - last_len).to(tl.int32)[None, :] == group_ids[:, None]
            column += tl.sum(mass, axis=0)
            sums += tl.sum(tl.where(mine[:, :, None], mass[None, :, :], 0.0), axis=1)
        sizes = tl.where(group_ids == 1, last_len, rows - last_len).to(tl.float32)
        tl.store(Column + bh * nk + n, column / rows, mask=col_ok)
        tl.store(GroupMass + out, sums / tl.maximum(sizes, 1.0)[:, None], mask=col_ok[None, :])


@triton.jit
def _estimate_kernel(
    Logits, Column, GroupMass, Est, RowMin, Counts, mq, nk, kv_len, block_size, exact, scale, js_limit, lam, tau,
    IS_CAUSAL: tl.constexpr, LAM: tl.constexpr, KNOWN_LOW: tl.constexpr, BM: tl.constexpr, NKP: tl.constexpr,
    MQP: tl.constexpr,
):
    """Each row's block-mass estimate ``[BM, nk]``: the exact rows their group's mean mass; the others, per
    head, the pooled softmax where it agrees with the column at the last row (Jensen-Shannon distance below
    ``js_limit``), else the column's vertical-slash lines. With ``KNOWN_LOW`` it also counts DAM's threshold;
    otherwise it stores each row's minimum for :func:`_threshold_kernel`."""
    bh, m0 = tl.program_id(1), tl.program_id(0) * BM
    m, n, visible = row_tile(m0, mq, nk, IS_CAUSAL, BM, NKP)
    column = tl.load(Column + bh * nk + n, mask=n < nk, other=0.0)
    # FlexPrefill's test on the last row: pooled softmax against the exact column mass.
    last_row = tl.zeros([1], tl.int32) + mq - 1
    last_ok = n < nk
    if IS_CAUSAL:
        last_ok = last_ok & (n <= mq - 1)
    last_logit = tl.load(Logits + (bh * mq + mq - 1) * nk + n, mask=last_ok, other=0.0) * scale
    last_logit = tl.where(last_ok, last_logit + tl.sum(_seen_log(last_row, n, nk, kv_len, block_size, IS_CAUSAL),
                                                       axis=0), float("-inf"))
    last = tl.exp(last_logit - tl.max(last_logit, axis=0))
    last = last / tl.sum(last, axis=0)
    mid = 0.5 * (last + column)
    kl_last = tl.sum(last * tl.log(tl.maximum(last, _EPS) / tl.maximum(mid, _EPS)), axis=0)
    kl_column = tl.sum(column * tl.log(tl.maximum(column, _EPS) / tl.maximum(mid, _EPS)), axis=0)
    query_aware = tl.sqrt(tl.maximum(0.5 * (kl_last + kl_column), 0.0)) < js_limit
    cell = m[:, None] * nk + n[None, :]
    if query_aware:
        logit = tl.load(Logits + bh * mq * nk + cell, mask=visible, other=0.0) * scale
        logit = tl.where(visible, logit + _seen_log(m, n, nk, kv_len, block_size, IS_CAUSAL), float("-inf"))
        peak = tl.max(logit, axis=1)
        weight = tl.exp(logit - tl.where(peak == float("-inf"), 0.0, peak)[:, None])
        total = tl.sum(weight, axis=1)
        est = weight / tl.where(total > 0, total, 1.0)[:, None]  # rows past the end: none visible
    else:
        source = mq - 1 - (m[:, None] - n[None, :])  # the last row's key block at the same offset
        diagonal = tl.load(Column + bh * nk + source, mask=visible & (source >= 0) & (source < nk), other=0.0)
        est = tl.where(visible, column[None, :] + diagonal, 0.0)
        est = est / tl.maximum(tl.sum(est, axis=1), _EPS)[:, None]
    group_slot = m - mq + 2
    is_exact = (m >= mq - exact) & (m < mq)
    exact_mass = tl.load(GroupMass + (bh * 2 + group_slot[:, None]) * nk + n[None, :],
                         mask=is_exact[:, None] & (n[None, :] < nk), other=0.0)
    est = tl.where(is_exact[:, None], exact_mass, tl.where(visible, est, 0.0))
    row_ok = m < mq
    tl.store(Est + bh * mq * nk + cell, est, mask=row_ok[:, None] & (n[None, :] < nk))
    if KNOWN_LOW:
        count_threshold(est, visible, m, n, Counts, bh, mq, nk, box_cox_low(RowMin, bh, mq, lam, LAM, True, MQP),
                        lam, tau, LAM)
    else:
        tl.store(RowMin + bh * mq + m, tl.min(tl.where(n[None, :] < nk, est, float("inf")), axis=1), mask=row_ok)


@triton.jit
def _threshold_kernel(
    Est, RowMin, Counts, mq, nk, lam, tau,
    IS_CAUSAL: tl.constexpr, LAM: tl.constexpr, BM: tl.constexpr, NKP: tl.constexpr, MQP: tl.constexpr,
):
    """:func:`count_threshold` once the head's minimum is known (maps without invisible blocks)."""
    bh, m0 = tl.program_id(1), tl.program_id(0) * BM
    m, n, visible = row_tile(m0, mq, nk, IS_CAUSAL, BM, NKP)
    est = tl.load(Est + bh * mq * nk + m[:, None] * nk + n[None, :], mask=visible, other=0.0)
    count_threshold(est, visible, m, n, Counts, bh, mq, nk, box_cox_low(RowMin, bh, mq, lam, LAM, False, MQP), lam,
                    tau, LAM)


@triton.jit
def _need_kernel(
    Est, RowMin, Counts, Known, Need, Threshold, Always, Seen, mq, nk, exact, sink_blocks, local_blocks, lam,
    tau, mu, mass_target,
    IS_CAUSAL: tl.constexpr, LAM: tl.constexpr, KNOWN_LOW: tl.constexpr, BM: tl.constexpr, NKP: tl.constexpr,
    MQP: tl.constexpr,
):
    """Per row, how many blocks it needs (the forced ones, then by mass while the mass before a block is below
    ``mass_target``), the mass threshold of the second kind, and its always-kept and visible block counts."""
    bh, m0 = tl.program_id(1), tl.program_id(0) * BM
    m, n, visible, est, priority, forced, always = _row_order(
        Est, RowMin, Counts, Known, bh, m0, mq, nk, exact, sink_blocks, local_blocks, lam, tau, mu,
        IS_CAUSAL, LAM, KNOWN_LOW, BM, NKP, MQP)
    forced_mass = tl.sum(tl.where(forced, est, 0.0), axis=1)
    threshold = _smallest_passing(tl.where(visible & ~forced, est, 0.0), forced_mass, mass_target)
    row = bh * mq + m
    row_ok = m < mq
    tl.store(Threshold + row, threshold, mask=row_ok)
    tl.store(Need + row, tl.sum(_needed(visible, est, forced, threshold).to(tl.int32), axis=1), mask=row_ok)
    tl.store(Always + row, tl.sum(always.to(tl.int32), axis=1), mask=row_ok)
    tl.store(Seen + row, tl.sum(visible.to(tl.int32), axis=1), mask=row_ok)


@triton.jit
def _head_budget_factor(Need, Always, Seen, bh, mq, exact, density, MQP: tl.constexpr):
    """``_mass_budgets``' common factor for the head's rows before the last ``exact``: what the ``density`` cap
    leaves after the exact rows' needs, over the other rows' needs beyond their always-kept blocks (at most
    1). Float64 as the definition, but ``(visible - forced) * density``, which it computes in float32."""
    rows = tl.arange(0, MQP)
    ok = rows < mq
    forced = tl.load(Always + bh * mq + rows, mask=ok, other=0).to(tl.int64)
    extra = tl.maximum(tl.load(Need + bh * mq + rows, mask=ok, other=0).to(tl.int64) - forced, 0).to(tl.float64)
    seen = tl.sum(tl.load(Seen + bh * mq + rows, mask=ok, other=0).to(tl.int64), axis=0)
    share = (seen - tl.sum(forced, axis=0)).to(tl.float32) * density
    exact_extra = tl.sum(tl.where((rows >= mq - exact) & ok, extra, 0.0), axis=0)
    capped = tl.sum(tl.where(rows < mq - exact, extra, 0.0), axis=0)
    allowance = tl.floor(share).to(tl.float64) - exact_extra
    return tl.minimum(tl.maximum(allowance, 0.0) / tl.maximum(capped, 1.0), 1.0)


@triton.jit
def _lists_kernel(
    Est, RowMin, Counts, Known, Threshold, Need, Always, Seen, PartCount, PartIndex, FullCount, FullIndex,
    mq, nk, exact, sink_blocks, local_blocks, lam, tau, mu, density,
    IS_CAUSAL: tl.constexpr, LAM: tl.constexpr, KNOWN_LOW: tl.constexpr, BM: tl.constexpr, NKP: tl.constexpr,
    MQP: tl.constexpr,
):
    """Each row keeps the first ``budget`` blocks it needs (``_mass_budgets``), in priority order (ties: lower
    block first), written as ascending lists: blocks the causal diagonal cuts (partial) apart from whole ones."""
    bh, m0 = tl.program_id(1), tl.program_id(0) * BM
    m, n, visible, est, priority, forced, _ = _row_order(
        Est, RowMin, Counts, Known, bh, m0, mq, nk, exact, sink_blocks, local_blocks, lam, tau, mu,
        IS_CAUSAL, LAM, KNOWN_LOW, BM, NKP, MQP)
    row_ok = m < mq
    needed = _needed(visible, est, forced, tl.load(Threshold + bh * mq + m, mask=row_ok, other=float("inf")))
    factor = _head_budget_factor(Need, Always, Seen, bh, mq, exact, density, MQP)
    forced_count = tl.load(Always + bh * mq + m, mask=row_ok, other=0)
    extra = tl.maximum(tl.load(Need + bh * mq + m, mask=row_ok, other=0) - forced_count, 0).to(tl.float64)
    budget = forced_count + tl.where(m < mq - exact, tl.floor(extra * factor), extra).to(tl.int32)
    # The budget-th largest priority among the needed blocks: the largest p with count(priority >= p) >= budget.
    bits = priority.to(tl.int32, bitcast=True)
    lo = tl.zeros([BM], tl.int32)
    hi = tl.full([BM], _INF_BITS, tl.int32)
    for _ in range(32):
        active = hi - lo > 1
        mid = lo + (hi - lo) // 2
        ok = tl.sum((needed & (bits >= mid[:, None])).to(tl.int32), axis=1) >= budget
        lo = tl.where(active & ok, mid, lo)
        hi = tl.where(active & ~ok, mid, hi)
    above = needed & (bits > lo[:, None])
    tied = needed & (bits == lo[:, None])
    room = budget - tl.sum(above.to(tl.int32), axis=1)
    chosen = above | (tied & (tl.cumsum(tied.to(tl.int32), axis=1) <= room[:, None]))
    chosen = tl.where((tl.sum(needed.to(tl.int32), axis=1) <= budget)[:, None], needed, chosen & (budget > 0)[:, None])
    if IS_CAUSAL:
        whole = (m[:, None] - n[None, :]) > 0
    else:
        whole = visible
    _write_list(chosen & ~whole, PartCount, PartIndex, bh, m, n, mq, nk)
    _write_list(chosen & whole, FullCount, FullIndex, bh, m, n, mq, nk)


@triton.jit
def _write_list(keep, Count, Index, bh, m, n, mq, nk):
    """Row ``m``'s kept blocks ascending in slots ``0..count-1``, zeros after (``lists_from_table``'s layout)."""
    row_ok = m < mq
    count = tl.sum(keep.to(tl.int32), axis=1)
    tl.store(Count + bh * mq + m, count, mask=row_ok)
    row = Index + (bh * mq + m[:, None]) * nk
    slot = tl.cumsum(keep.to(tl.int32), axis=1) - 1
    tl.store(row + slot, tl.zeros_like(slot) + n[None, :], mask=keep & row_ok[:, None])
    tl.store(row + n[None, :], tl.zeros_like(slot), mask=(n[None, :] >= count[:, None]) & (n[None, :] < nk)
             & row_ok[:, None])


# ---- host side ----------------------------------------------------------------------------------------------

def fused_plan_runs(query: Tensor, block_size: int) -> bool:
    """Whether ``dam::dynamic_plan`` computes the adaptive plan with these kernels: on CUDA, where the
    last-rows kernel runs. (CPU plans stay on the PyTorch definition; tests run the kernels in the
    interpreter by calling :func:`adaptive_block_plan`.)"""
    return query.is_cuda and kernel_runs(query, block_size)


def _block_means(x: Tensor, block_size: int) -> Tensor:
    """``[..., L, D]`` -> float32 ``[..., ceil(L / block), D]``, the mean of each block's rows (as
    ``pooled_estimate`` computes them: sums over float32, divided by the block's token count)."""
    length = x.shape[-2]
    if length % block_size == 0:  # one reduction (a power-of-two count: the same floats as sum / count)
        return x.unflatten(-2, (length // block_size, block_size)).mean(-2, dtype=torch.float32)
    sums = block_sums(x, block_size)
    means = sums / block_size
    means[..., -1, :] = sums[..., -1, :] / (length - (sums.shape[-2] - 1) * block_size)
    return means


def _pooled_logits(query: Tensor, key: Tensor, block_size: int) -> Tensor:
    """``[B * H, Mq, Nk]`` float32: (mean query of each block) . (mean key of each block), unscaled, grouped
    heads against their KV head in place."""
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    q_mean, k_mean = _block_means(query, block_size), _block_means(key, block_size)
    mq, nk = q_mean.shape[-2], k_mean.shape[-2]
    grouped = q_mean.reshape(batch, kv_heads, heads // kv_heads * mq, dim)
    return torch.matmul(grouped, k_mean.transpose(-1, -2)).reshape(batch * heads, mq, nk)


class PlanLayout(NamedTuple):
    """What the launches need besides the tensors, computed once per shape (host time counts)."""

    mq: int
    nk: int
    rows: int  # exact query rows
    last_len: int  # queries in the last query block
    exact: int  # exact query blocks (1, or 2 when the last is ragged)
    grid: tuple[int, int]  # (row tiles, batch * heads)
    exact_grid: tuple[int, int]  # (batch * heads, exact-row tiles)
    exact_rows_per_program: int
    known_low: bool  # invisible blocks: the map's minimum is 0
    constexprs: dict


@functools.lru_cache(maxsize=256)
def plan_layout(batch: int, heads: int, q_len: int, kv_len: int, block_size: int, is_causal: bool,
                box_cox_lambda: float) -> PlanLayout:
    """The launch layout of a fused plan for these sizes (cached: the same for every layer of a forward)."""
    mq, nk = cdiv(q_len, block_size), cdiv(kv_len, block_size)
    rows = exact_query_rows(q_len, block_size)
    last_len = q_len - (mq - 1) * block_size
    nkp, mqp = max(16, next_power_of_2(nk)), max(16, next_power_of_2(mq))
    bm = max(1, min(16, TILE_ELEMENTS // nkp))
    known_low = is_causal and nk > 1
    lam = "log" if box_cox_lambda == 0 else "sqrt" if box_cox_lambda == 0.5 else "pow"
    return PlanLayout(mq, nk, rows, last_len, 2 if rows > last_len else 1, (cdiv(mq, bm), batch * heads),
                      (batch * heads, cdiv(rows, bm)), bm, known_low,
                      dict(IS_CAUSAL=is_causal, LAM=lam, KNOWN_LOW=known_low, BM=bm, NKP=nkp, MQP=mqp,
                           num_warps=4 if nkp <= 1024 else 8))


def adaptive_block_plan(
    query: Tensor, key: Tensor, *, block_size: int, is_causal: bool, scale: float | None, tau: float,
    box_cox_lambda: float, mu: float, density: float, mass_target: float, sink_blocks: int, local_blocks: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`dynamic_block_plan` with ``estimator="adaptive"``, for query ``[B, H, Lq, E]`` and key
    ``[B, KVH, Lk, E]``: ``(kv_num_blocks [B, H, Mq], kv_indices [B, H, Mq, Nk], full_kv_num_blocks,
    full_kv_indices)``, int32."""
    batch, heads, q_len, dim = query.shape
    kv_len = key.shape[-2]
    scale = softmax_scale(scale, dim)
    lay = plan_layout(batch, heads, q_len, kv_len, block_size, is_causal, box_cox_lambda)
    mq, nk, bh, dam = lay.mq, lay.nk, batch * heads, lay.constexprs
    ints, floats = dict(device=query.device, dtype=torch.int32), dict(device=query.device, dtype=torch.float32)
    column, group_mass, known = exact_rows(query, key, lay, block_size, is_causal, scale)
    logits = _pooled_logits(query, key, block_size)
    est, row_min = torch.empty((bh, mq, nk), **floats), torch.empty((bh, mq), **floats)
    counts = torch.zeros((bh, mq + 2 * nk - 1), **ints)  # per head: block diagonals, then columns
    _estimate_kernel[lay.grid](logits, column, group_mass, est, row_min, counts, mq, nk, kv_len, block_size,
                               lay.exact, scale, QUERY_AWARE_JS_DISTANCE, box_cox_lambda, tau, **dam)
    return lists_from_estimate(EstimateMaps(est, row_min, counts, known), lay, batch, heads,
                               BudgetRule(tau, box_cox_lambda, mu, density, mass_target, sink_blocks, local_blocks))


def exact_rows(query: Tensor, key: Tensor, lay: "PlanLayout", block_size: int, is_causal: bool,
               scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """The exact last queries (``exact_query_rows``) of every head, reduced: ``(column [BH, Nk]``, the mean
    block mass of all of them; ``group_mass [BH, 2, Nk]``, each exact query block's mean (the one before the
    last, the last); ``known`` int32 ``[BH, 2, Nk]``, the blocks any of a group's queries needs to reach
    ``EXACT_ROW_MASS`` of its own attention``)``. Two launches."""
    bh, nk, device = query.shape[0] * query.shape[1], lay.nk, query.device
    lse = launch_last_rows_block_lse(query, key, block_size, is_causal, scale)  # [B, KVH, G * R, Nk] = [BH, R, Nk]
    column = torch.empty((bh, nk), device=device, dtype=torch.float32)
    group_mass = torch.empty((bh, 2, nk), device=device, dtype=torch.float32)
    known = torch.zeros((bh, 2, nk), device=device, dtype=torch.int32)  # union of atomic maxima
    _exact_rows_kernel[lay.exact_grid](lse, column, group_mass, known, lay.rows, lay.last_len, nk, EXACT_ROW_MASS,
                                       BR=lay.exact_rows_per_program, NKP=lay.constexprs["NKP"],
                                       num_warps=lay.constexprs["num_warps"])
    return column, group_mass, known


class EstimateMaps(NamedTuple):
    """What an estimate kernel leaves for the budget and list kernels, per ``bh = b * H + h``: ``est`` float32
    ``[BH, Mq, Nk]`` (each row's block mass), ``row_min`` float32 ``[BH, Mq]`` (each row's minimum; read only
    when the map has no invisible block), ``counts`` int32 ``[BH, Mq + 2 Nk - 1]`` (DAM's threshold hits per
    block diagonal, then per column; filled already when the layout's ``known_low``, else counted here) and
    ``known`` int32 ``[BH, 2, Nk]`` (blocks the exact query blocks need: the one before the last, the last)."""

    est: Tensor
    row_min: Tensor
    counts: Tensor
    known: Tensor


class BudgetRule(NamedTuple):
    """The dynamic plan's DAM transform and budget options (``dynamic_block_plan``'s meanings)."""

    tau: float
    box_cox_lambda: float
    mu: float
    density: float
    mass_target: float
    sink_blocks: int
    local_blocks: int


def lists_from_estimate(maps: EstimateMaps, lay: "PlanLayout", batch: int, heads: int,
                        rule: BudgetRule) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The plan lists of an estimate (DAM's threshold and patterns, the mass budgets, ascending lists):
    ``(kv_num_blocks [B, H, Mq], kv_indices [B, H, Mq, Nk], full_kv_num_blocks, full_kv_indices)``, int32.
    Shared by every estimator with a fused estimate kernel."""
    mq, nk, bh, dam = lay.mq, lay.nk, batch * heads, lay.constexprs
    device = maps.est.device
    ints, floats = dict(device=device, dtype=torch.int32), dict(device=device, dtype=torch.float32)
    if not lay.known_low:
        _threshold_kernel[lay.grid](maps.est, maps.row_min, maps.counts, mq, nk, rule.box_cox_lambda, rule.tau,
                                    **{k: v for k, v in dam.items() if k != "KNOWN_LOW"})
    need, always, seen = torch.empty((3, bh, mq), **ints)
    threshold = torch.empty((bh, mq), **floats)
    _need_kernel[lay.grid](*maps, need, threshold, always, seen, mq, nk, lay.exact, rule.sink_blocks,
                           rule.local_blocks, rule.box_cox_lambda, rule.tau, rule.mu, rule.mass_target, **dam)
    outputs = (torch.empty((batch, heads, mq), **ints), torch.empty((batch, heads, mq, nk), **ints),
               torch.empty((batch, heads, mq), **ints), torch.empty((batch, heads, mq, nk), **ints))
    _lists_kernel[lay.grid](*maps, threshold, need, always, seen, *outputs, mq, nk, lay.exact, rule.sink_blocks,
                            rule.local_blocks, rule.box_cox_lambda, rule.tau, rule.mu, rule.density, **dam)
    return outputs
