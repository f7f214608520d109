"""The default dynamic plan (``estimator="sampled"``) as Triton kernels, with no compile step and no host sync.

:func:`kernels.dynamic_mask.dynamic_block_plan` is the definition, in plain PyTorch. ``dam::dynamic_plan`` ran it
compiled with Inductor: some 50 kernels behind a Dynamo guard, about 1.5 ms of host time per call, which made a
real model's compiled prefill slower than eager at 8K (issue 38). Here:

1. ``dam::sampled_rows_block_lse``'s kernel: the exact per-key-block log-sum-exp of every eighth query of every
   query block;
2. the last query block's exact rows (``adaptive_plan_kernel.exact_rows``: two launches);
3. :func:`_sampled_estimate_kernel`: each row's estimate, the mean of its sampled queries' block mass (the exact
   rows their group's mean), and DAM's Box-Cox threshold counted per block diagonal and column;
4. the need and list kernels the adaptive plan shares (``adaptive_plan_kernel.lists_from_estimate``).

Eight launches (six kernels, two fills; one more kernel when the map has no invisible block), the same lists as
the definition up to float rounding at a threshold's edge and the order of exact ties. On an H100 it takes
0.3 ms of host time per call where the compiled definition took 1.1 ms (``benchmarks/notes_plan.md``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .adaptive_plan_kernel import (
    BudgetRule,
    EstimateMaps,
    box_cox_low,
    count_threshold,
    exact_rows,
    lists_from_estimate,
    plan_layout,
    row_tile,
)
from .block_estimates import sampled_per_block
from dam_compile.kernels.common import softmax_scale
from dam_compile.kernels.last_rows_lse import launch_sampled_rows_block_lse


@triton.jit
def _sampled_estimate_kernel(
    Lse, GroupMass, Est, RowMin, Counts, mq, nk, per_block, exact, lam, tau,
    IS_CAUSAL: tl.constexpr, LAM: tl.constexpr, KNOWN_LOW: tl.constexpr, BM: tl.constexpr, NKP: tl.constexpr,
    MQP: tl.constexpr,
):
    """Rows ``[BM, nk]`` of the estimate: the mean over a block's ``per_block`` sampled queries of each one's
    block mass (its row of ``Lse [BH, Mq, per_block, Nk]`` normalised), summed in sample order; the exact
    rows their group's mean mass. With ``KNOWN_LOW`` it counts DAM's threshold, else stores each row's minimum."""
    bh, m0 = tl.program_id(1), tl.program_id(0) * BM
    m, n, visible = row_tile(m0, mq, nk, IS_CAUSAL, BM, NKP)
    row_ok = m < mq
    ok = row_ok[:, None] & (n[None, :] < nk)
    total = tl.zeros([BM, NKP], tl.float32)
    for p in range(per_block):
        lse = tl.load(Lse + ((bh * mq + m[:, None]) * per_block + p) * nk + n[None, :], mask=ok,
                      other=float("-inf"))
        peak = tl.max(lse, axis=1)
        safe = tl.where(peak == float("-inf"), 0.0, peak)
        norm = tl.log(tl.sum(tl.exp(lse - safe[:, None]), axis=1)) + safe
        total += tl.where(ok, tl.exp(lse - norm[:, None]), 0.0)
    est = total / per_block
    group_slot = m - mq + 2
    is_exact = (m >= mq - exact) & row_ok
    exact_mass = tl.load(GroupMass + (bh * 2 + group_slot[:, None]) * nk + n[None, :],
                         mask=is_exact[:, None] & (n[None, :] < nk), other=0.0)
    est = tl.where(is_exact[:, None], exact_mass, est)
    tl.store(Est + (bh * mq + m[:, None]) * nk + n[None, :], est, mask=ok)
    if KNOWN_LOW:
        count_threshold(est, visible, m, n, Counts, bh, mq, nk, box_cox_low(RowMin, bh, mq, lam, LAM, True, MQP),
                        lam, tau, LAM)
    else:
        tl.store(RowMin + bh * mq + m, tl.min(tl.where(n[None, :] < nk, est, float("inf")), axis=1), mask=row_ok)


def sampled_block_plan(
    query: Tensor, key: Tensor, *, block_size: int, is_causal: bool, scale: float | None, tau: float,
    box_cox_lambda: float, mu: float, density: float, mass_target: float, sink_blocks: int, local_blocks: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`dynamic_block_plan` with ``estimator="sampled"``, for query ``[B, H, Lq, E]`` and key
    ``[B, KVH, Lk, E]``: ``(kv_num_blocks [B, H, Mq], kv_indices [B, H, Mq, Nk], full_kv_num_blocks,
    full_kv_indices)``, int32."""
    batch, heads, q_len, dim = query.shape
    kv_len = key.shape[-2]
    scale = softmax_scale(scale, dim)
    lay = plan_layout(batch, heads, q_len, kv_len, block_size, is_causal, box_cox_lambda)
    mq, nk, bh = lay.mq, lay.nk, batch * heads
    per_block = sampled_per_block(block_size)
    sampled = launch_sampled_rows_block_lse(query, key, block_size, per_block, is_causal, scale)  # [BH, Mq, P, Nk]
    _, group_mass, known = exact_rows(query, key, lay, block_size, is_causal, scale)
    est = torch.empty((bh, mq, nk), device=query.device, dtype=torch.float32)
    row_min = torch.empty((bh, mq), device=query.device, dtype=torch.float32)
    counts = torch.zeros((bh, mq + 2 * nk - 1), device=query.device, dtype=torch.int32)
    _sampled_estimate_kernel[lay.grid](sampled, group_mass, est, row_min, counts, mq, nk, per_block, lay.exact,
                                       box_cox_lambda, tau, **lay.constexprs)
    return lists_from_estimate(EstimateMaps(est, row_min, counts, known), lay, batch, heads,
                               BudgetRule(tau, box_cox_lambda, mu, density, mass_target, sink_blocks, local_blocks))
