"""DAM online: a per-input block-sparse plan computed from the same query and key the attention uses.

Steps, per (batch, query head), all at block level (``Mq x Nk`` per head, ``block_size**2`` times smaller than
the attention):

1. **Estimate** the block attention map (``kernels/block_estimates.py``): ``"sampled"`` (the default: every
   query block's mean exact block mass over every eighth of its queries, so every row's plan follows its own
   attention, as XAttention and SampleAttention estimate all rows; the last query block exact), ``"adaptive"``
   (per head FlexPrefill's choice between the query-aware pooled estimate and MInference's vertical-slash lines
   from the exact attention of the last query block, whose own row is that exact mass; with the block before
   it when the last one is ragged), ``"pooled"`` or ``"last_block"``.
2. **DAM transform**: Box-Cox (``box_cox_lambda``) of the map, shifted to a minimum of 0, thresholded at ``tau``.
3. **Patterns**: like DAM's step 4 at block level, a block diagonal or column is kept whole when at least
   ``mu`` of its visible blocks passed the threshold. Blocks the estimate knows a row needs (``"sampled"`` and
   ``"adaptive"``: the last query block's, from each query's exact scores) rank with these.
4. **Always kept**: ``sink_blocks`` leading key blocks and ``local_blocks`` blocks up to the diagonal.
5. **Budget**: each row takes blocks in order (always-kept, then DAM-kept, then by estimated mass) until their
   estimated mass reaches ``mass_target``. Beyond the always-kept blocks a head keeps at most ``density`` of its
   other visible blocks (the estimator's ``density`` defaults: no cap for ``"sampled"``). ``"sampled"`` and
   ``"adaptive"`` (``mass_budget`` in ``estimators.py``): the budget follows the mass: a row keeps what it needs
   (the exact last rows first, with every block any of their queries needs; under a cap, rows needing more than
   is left are cut by one common factor). ``"pooled"``/``"last_block"``: each row gets a fixed share of that
   budget, by row length.

Written in plain PyTorch with no data-dependent shapes or host syncs, so inside a compiled graph Inductor
traces and fuses it. This is the definition: on CUDA, ``dam::dynamic_plan`` computes the sampled and adaptive
plans with the Triton kernels of ``kernels/sampled_plan_kernel.py`` and ``kernels/adaptive_plan_kernel.py`` (the
same lists, no compile step, a tenth of the host time), and runs the others compiled once (the exact row masses
through the ``dam::sampled_rows_block_lse`` / ``dam::last_rows_block_lse`` Triton kernels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .block_estimates import ALWAYS_PRIORITY, DAM_PRIORITY, visible_blocks
from .estimators import DEFAULT_ESTIMATOR, ESTIMATOR_SPECS, estimator_spec
from dam_compile.plan.dam_patterns import shifted_box_cox
from dam_compile.plan.arith import cdiv, softmax_scale
from dam_compile.plan.block_plan import lists_from_table, num_blocks
from dam_compile.plan.defaults import (DEFAULT_BOX_COX_LAMBDA, DEFAULT_LOCAL_BLOCKS, DEFAULT_MU, DEFAULT_SINK_BLOCKS,
                                       DEFAULT_TAU)

# Share of each query block's estimated attention mass its plan keeps: on SmolLM2-135M, 8K tokens of news prose
# (float32, CPU), 0.99 keeps the perplexity within 0.1% of full attention, 0.98 within 0.4%, 0.95 within 1.3%
# (benchmarks/notes_real.md).
DEFAULT_MASS_TARGET = 0.99


def _same(x: Tensor) -> Tensor:
    return x


@dataclass(frozen=True)
class QueryShard:
    """The query blocks of one context-parallel rank: a shard of whole blocks of a ``q_len``-token sequence,
    block ``m`` of the shard being block ``blocks[m]`` of the sequence (int64 ``[Mq_shard]``). The plan's few
    sums and minima over every row of a head are taken over all ranks' rows by ``all_sum`` / ``all_min``
    (all-reduces of small ``[B, H, ...]`` tensors)."""

    blocks: Tensor
    q_len: int
    all_sum: Callable[[Tensor], Tensor] = _same
    all_min: Callable[[Tensor], Tensor] = _same


def _dam_threshold(estimate: Tensor, visible: Tensor, tau: float, box_cox_lambda: float,
                   all_min: Callable[[Tensor], Tensor] = _same) -> Tensor:
    """Box-Cox, shift to minimum 0 per head map, threshold: bool ``[B, H, Mq, Nk]``."""
    # float32 like the estimate: this runs inside the compiled graph on every call.
    return (shifted_box_cox(estimate, box_cox_lambda, torch.float32, all_min) >= tau) & visible


def _block_patterns(mask: Tensor, visible: Tensor, offset: Tensor, mu: float, whole_visible: Tensor,
                    whole_offset: Tensor, all_sum: Callable[[Tensor], Tensor] = _same) -> Tensor:
    """Blocks on block diagonals / columns where at least ``mu`` of the visible blocks are in ``mask``.
    ``mask``, ``visible``, ``offset``: the rows planned here; ``whole_*``: every row of the sequence (the
    fractions are over all of them; ``all_sum`` adds the hits of rows planned elsewhere)."""
    nk = mask.shape[-1]
    hits = mask.to(torch.float32)
    # Per offset d = m - n (shifted by nk - 1 to be >= 0): fraction of its visible blocks in the mask.
    index = (offset + nk - 1).expand_as(hits).reshape(*hits.shape[:-2], -1)
    slots = whole_offset.shape[-2] + nk - 1
    per_offset = all_sum(hits.new_zeros((*hits.shape[:-2], slots)).scatter_add(-1, index, hits.flatten(-2)))
    offset_size = hits.new_zeros(slots).scatter_add(0, (whole_offset + nk - 1).flatten(),
                                                    whole_visible.flatten().float())
    diag_keep = per_offset >= mu * offset_size.clamp_min(1)
    diag = diag_keep.gather(-1, index).view_as(mask)
    col_keep = all_sum(hits.sum(-2)) >= mu * whole_visible.sum(-2).clamp_min(1)
    return (diag | col_keep[..., None, :]) & visible


def dynamic_block_plan(
    query: Tensor,
    key: Tensor,
    *,
    block_size: int,
    is_causal: bool,
    scale: float | None = None,
    tau: float = DEFAULT_TAU,
    box_cox_lambda: float = DEFAULT_BOX_COX_LAMBDA,
    mu: float = DEFAULT_MU,
    density: float | None = None,
    mass_target: float = DEFAULT_MASS_TARGET,
    sink_blocks: int = DEFAULT_SINK_BLOCKS,
    local_blocks: int = DEFAULT_LOCAL_BLOCKS,
    estimator: str = DEFAULT_ESTIMATOR,
    shard: QueryShard | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The dynamic DAM plan for query ``[B, H, Lq, E]`` and key ``[B, KVH, Lk, E]``.

    ``shard``: the query is a context-parallel rank's blocks of a longer sequence (the ``sampled`` estimator,
    causal): the plan's rows are those the whole sequence's plan has for them. ``density``: ``None`` takes the
    estimator's own cap (its ``density.prefill_cap`` in ``estimators.py``).

    Returns ``(kv_num_blocks [B, H, Mq], kv_indices [B, H, Mq, K], full_kv_num_blocks, full_kv_indices)``
    (int32, :class:`BlockSparsePlan` layout; partial blocks are those the causal diagonal cuts), with ``K`` from
    :func:`dynamic_plan_width`."""
    spec = estimator_spec(estimator)
    if shard is not None and (spec.shard_estimate is None or not is_causal):
        sharded = " or ".join(name for name, s in ESTIMATOR_SPECS.items() if s.shard_estimate is not None)
        raise ValueError(f"shard: a context-parallel plan takes the {sharded} estimator and causal attention, got "
                         f"estimator={estimator!r}, is_causal={is_causal}")
    scale = softmax_scale(scale, query.shape[-1])
    density = spec.density.prefill_cap if density is None else density
    if shard is None:
        estimate, known, exact = spec.estimate(query, key, block_size, is_causal, scale)
        all_sum, all_min = _same, _same
    else:
        estimate, known, exact = spec.shard_estimate(query, key, block_size, scale, shard.blocks, shard.q_len)
        all_sum, all_min = shard.all_sum, shard.all_min
    mq, nk = estimate.shape[-2:]
    device = query.device
    exact = torch.zeros(mq, dtype=torch.bool, device=device) if exact is None else exact
    # The whole sequence's geometry, and the rows planned here.
    whole_visible, whole_offset = visible_blocks(mq if shard is None else num_blocks(shard.q_len, block_size), nk,
                                                 is_causal, device)
    rows = None if shard is None else shard.blocks.to(device)
    visible, offset = (whole_visible, whole_offset) if rows is None else (whole_visible[rows], whole_offset[rows])

    dam = _dam_threshold(estimate, visible, tau, box_cox_lambda, all_min)
    dam = dam | _block_patterns(dam, visible, offset, mu, whole_visible, whole_offset, all_sum)
    if known is not None:  # blocks exact scores say a row needs rank with DAM's
        dam = dam | known
    always_of = lambda vis, off: vis & ((torch.arange(nk, device=device) < sink_blocks)[None, :]  # noqa: E731
                                        | (((off >= 0) & (off < local_blocks)) if is_causal else off.abs() < local_blocks))
    always = always_of(visible, offset)
    priority = torch.where(always, ALWAYS_PRIORITY, torch.where(dam, DAM_PRIORITY, 0.0)) + estimate

    width = dynamic_plan_width(nk, density, sink_blocks, local_blocks, estimator)
    if spec.mass_budget:  # every block may be needed: a full sort, cheaper than a topk of every element
        top_priority, top_index = priority.sort(dim=-1, descending=True)
    else:
        top_priority, top_index = priority.topk(width, dim=-1)
    top_mass = estimate.gather(-1, top_index)
    top_visible = visible.expand_as(priority).gather(-1, top_index)
    # Sorted by priority, the blocks a row needs (always-kept, DAM-kept, then by mass until the target) are a
    # prefix of its list.
    mass_before = top_mass.cumsum(-1) - top_mass
    needed = ((top_priority >= DAM_PRIORITY) | (mass_before < mass_target)) & top_visible
    if spec.mass_budget:
        whole_always = always if rows is None else always_of(whole_visible, whole_offset)
        optional = whole_visible.sum() - whole_always.sum()
        budget = _mass_budgets(needed.sum(-1), always.sum(-1), optional, density, exact, all_sum)
    else:
        budget = _row_budgets(visible, always, density)
    chosen = needed & (torch.arange(width, device=device) < budget[..., None])
    # Back to a [.., Mq, Nk] table, then lists by a prefix sum (no sort of the index lists).
    table = torch.zeros_like(priority, dtype=torch.bool).scatter(-1, top_index, chosen)
    whole = (offset > 0) if is_causal else visible
    partial_lists, full_lists = lists_from_table(table & ~whole), lists_from_table(table & whole)
    # Contiguous, as the op's fake outputs promise (Inductor checks the strides).
    return (partial_lists[0], partial_lists[1][..., :width].contiguous(), full_lists[0],
            full_lists[1][..., :width].contiguous())


def dynamic_plan_width(nk: int, density: float, sink_blocks: int, local_blocks: int,
                       estimator: str = DEFAULT_ESTIMATOR) -> int:
    """Width ``K`` of the dynamic plan's index lists for ``nk`` key blocks (works on symbolic sizes too): every
    block for the estimators whose budgets follow the mass (a row may need many), else the fixed per-row share plus
    sink and local."""
    if estimator_spec(estimator).mass_budget:
        return nk
    return torch.sym_min(nk, cdiv(nk * math.ceil(density * 1000), 1000) + sink_blocks + local_blocks)


def _mass_budgets(need: Tensor, forced: Tensor, optional: Tensor, density: float, exact: Tensor,
                  all_sum: Callable[[Tensor], Tensor] = _same) -> Tensor:
    """Blocks each row may keep, int64 ``[B, H, Mq]``, from what it needs (``need``: always-kept, DAM-kept and
    the blocks reaching the mass target). Floor: the always-kept blocks (``forced [Mq]``). Cap: beyond those, the
    head keeps at most ``density`` of its ``optional`` blocks (its visible blocks not always kept, over the whole
    sequence); the ``exact`` rows (bool ``[Mq]``) take what they need first (their estimate is exact and they ask
    the question), and when the other rows need more than is left, each row's extra need is cut by the same
    factor (``all_sum`` adds what rows planned elsewhere need)."""
    extra = (need - forced).clamp_min(0).to(torch.float64)
    capped, exact_extra = extra.masked_fill(exact, 0.0), extra.masked_fill(~exact, 0.0)
    allowance = torch.floor(optional * density) - all_sum(exact_extra.sum(-1, keepdim=True))
    factor = (allowance.clamp_min(0) / all_sum(capped.sum(-1, keepdim=True)).clamp_min(1.0)).clamp(max=1.0)
    return forced + torch.where(exact, extra, torch.floor(capped * factor)).to(torch.int64)


def _row_budgets(visible: Tensor, always: Tensor, density: float) -> Tensor:
    """Blocks each query-block row may keep, int64 ``[Mq]`` (the ``pooled`` and ``last_block`` estimators): its
    always-kept blocks plus a share, proportional to its other visible blocks, of ``density`` of the head's
    blocks that are not always kept (short early rows would otherwise round up to more)."""
    seen, forced = visible.sum(-1).to(torch.float64), always.sum(-1).to(torch.float64)
    optional = seen - forced
    extra = torch.floor(torch.floor(optional.sum() * density) * optional / optional.sum().clamp_min(1.0))
    return (forced + extra).to(torch.int64)
