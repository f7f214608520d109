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
   other visible blocks (``DENSITY_DEFAULTS``: no cap for ``"sampled"``). ``"sampled"`` and ``"adaptive"``:
   the budget follows the mass: a row keeps what it needs (the exact last rows first, with every block any of
   their queries needs; under a cap, rows needing more than is left are cut by one common factor).
   ``"pooled"``/``"last_block"``: each row gets a fixed share of that budget, by row length.

Written in plain PyTorch with no data-dependent shapes or host syncs, so inside a compiled graph Inductor
traces and fuses it. This is the definition: on CUDA, ``dam::dynamic_plan`` computes the sampled and adaptive
plans with the Triton kernels of ``kernels/sampled_plan_kernel.py`` and ``kernels/adaptive_plan_kernel.py`` (the
same lists, no compile step, a tenth of the host time), and runs the others compiled once (the exact row masses
through the ``dam::sampled_rows_block_lse`` / ``dam::last_rows_block_lse`` Triton kernels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .block_estimates import ESTIMATES, FIXED_DENSITY, sampled_shard_estimate, visible_blocks
from dam_compile.plan.dam_patterns import shifted_box_cox
from dam_compile.plan.block_plan import lists_from_table, num_blocks

ESTIMATORS = ("sampled", "adaptive", "pooled", "last_block")
DEFAULT_ESTIMATOR = "sampled"
# Share of each query block's estimated attention mass its plan keeps: on SmolLM2-135M, 8K tokens of news prose
# (float32, CPU), 0.99 keeps the perplexity within 0.1% of full attention, 0.98 within 0.4%, 0.95 within 1.3%
# (benchmarks/notes_real.md).
DEFAULT_MASS_TARGET = 0.99
# Estimators whose budgets follow the estimated mass (every block may be needed: a full sort, cheaper than topk of
# every element); the others give each row a fixed share of ``density``.
MASS_BUDGETS = ("sampled", "adaptive")


class DensityDefaults(NamedTuple):
    """What an estimator takes when the config leaves ``density`` unset: ``prefill_cap``, the share of a head's
    other visible blocks it may keep beyond sink and local (1.0: no cap), and ``decode_floor``, the share a
    decode step keeps at least (beside every block holding ``EXACT_ROW_MASS`` of its exact attention)."""

    prefill_cap: float
    decode_floor: float


# sampled: budgets follow the mass alone (a cap cuts the diffuse heads of a real model's early layers; on
# SmolLM2-135M at 8K its layers 1-10 keep 62-75% of their blocks for 0.99 of their mass:
# benchmarks/results/real_cpu.json). The others keep their earlier fixed default.
DENSITY_DEFAULTS = {"sampled": DensityDefaults(1.0, 0.0),
                    **{e: DensityDefaults(FIXED_DENSITY, FIXED_DENSITY) for e in ("adaptive", "pooled", "last_block")}}
_ALWAYS, _DAM = 4.0, 2.0  # selection priorities above any mass estimate (which lies in [0, 1])


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
    tau: float = 0.3,
    box_cox_lambda: float = 0.5,
    mu: float = 0.8,
    density: float | None = None,
    mass_target: float = DEFAULT_MASS_TARGET,
    sink_blocks: int = 1,
    local_blocks: int = 2,
    estimator: str = DEFAULT_ESTIMATOR,
    shard: QueryShard | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The dynamic DAM plan for query ``[B, H, Lq, E]`` and key ``[B, KVH, Lk, E]``.

    ``shard``: the query is a context-parallel rank's blocks of a longer sequence (the ``sampled`` estimator,
    causal): the plan's rows are those the whole sequence's plan has for them. ``density``: ``None`` takes the
    estimator's own cap (``DENSITY_DEFAULTS``).

    Returns ``(kv_num_blocks [B, H, Mq], kv_indices [B, H, Mq, K], full_kv_num_blocks, full_kv_indices)``
    (int32, :class:`BlockSparsePlan` layout; partial blocks are those the causal diagonal cuts), with ``K`` from
    :func:`dynamic_plan_width`."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if shard is not None and (estimator != "sampled" or not is_causal):
        raise ValueError(f"shard: a context-parallel plan takes the sampled estimator and causal attention, got "
                         f"estimator={estimator!r}, is_causal={is_causal}")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    density = DENSITY_DEFAULTS[estimator].prefill_cap if density is None else density
    if shard is None:
        estimate, known, exact = ESTIMATES[estimator](query, key, block_size, is_causal, scale)
        all_sum, all_min = _same, _same
    else:
        estimate, known, exact = sampled_shard_estimate(query, key, block_size, scale, shard.blocks, shard.q_len)
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
    priority = torch.where(always, _ALWAYS, torch.where(dam, _DAM, 0.0)) + estimate

    width = dynamic_plan_width(nk, density, sink_blocks, local_blocks, estimator)
    if estimator in MASS_BUDGETS:
        top_priority, top_index = priority.sort(dim=-1, descending=True)
    else:
        top_priority, top_index = priority.topk(width, dim=-1)
    top_mass = estimate.gather(-1, top_index)
    top_visible = visible.expand_as(priority).gather(-1, top_index)
    # Sorted by priority, the blocks a row needs (always-kept, DAM-kept, then by mass until the target) are a
    # prefix of its list.
    mass_before = top_mass.cumsum(-1) - top_mass
    needed = ((top_priority >= _DAM) | (mass_before < mass_target)) & top_visible
    if estimator in MASS_BUDGETS:
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
    if estimator in MASS_BUDGETS:
        return nk
    return torch.sym_min(nk, (nk * math.ceil(density * 1000) + 999) // 1000 + sink_blocks + local_blocks)


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
