"""DAM online: a per-input block-sparse plan computed from the same query and key the attention uses.

Steps, per (batch, query head), all at block level (``Mq x Nk`` per head, ``block_size**2`` times smaller than
the attention):

1. **Estimate** the block attention map. ``"pooled"``: softmax over key blocks of (mean query of the block) .
   (mean key of the block) + log(keys it holds): a Monte-Carlo-free estimate of each block's share of the
   row's softmax mass. ``"last_block"`` (MInference-style): the exact probabilities of the last query block
   give per-key-block column mass and per-block-offset diagonal mass, extended to every row as columns +
   diagonals.
2. **DAM transform**: Box-Cox (``box_cox_lambda``) of the map, shifted to a minimum of 0, thresholded at ``tau``.
3. **Patterns**: like DAM's step 4 at block level, a block diagonal or column is kept whole when at least
   ``mu`` of its visible blocks passed the threshold.
4. **Always kept**: ``sink_blocks`` leading key blocks and ``local_blocks`` blocks up to the diagonal.
5. **Budget**: blocks are taken in order (always-kept, then DAM-kept, then by estimated mass) until their
   estimated mass reaches ``mass_target``, within a per-row budget: the head keeps at most ``density`` of its
   visible blocks (the always-kept ones first, the rest shared by row length): top-k by mass, so a head never
   exceeds its budget.

Written in plain PyTorch with no data-dependent shapes or host syncs, so inside a compiled graph Inductor
traces and fuses it (pooling reads Q and K once; the rest is tiny).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .dam_patterns import EPS, shifted_box_cox

ESTIMATORS = ("pooled", "last_block")
_ALWAYS, _DAM = 4.0, 2.0  # selection priorities above any mass estimate (which lies in [0, 1])


def _block_sums(x: Tensor, block_size: int) -> Tensor:
    """``[B, H, L, D]`` -> float32 ``[B, H, ceil(L / block), D]`` sums over each block's rows."""
    length = x.shape[-2]
    blocks = (length + block_size - 1) // block_size
    padded = F.pad(x, (0, 0, 0, blocks * block_size - length))
    return padded.unflatten(-2, (blocks, block_size)).sum(-2, dtype=torch.float32)


def _block_sizes(length: int, blocks: int, block_size: int, device: torch.device) -> Tensor:
    """Tokens in each of ``blocks`` blocks (the last may be ragged), float32 ``[blocks]``."""
    starts = torch.arange(blocks, device=device) * block_size
    return (length - starts).clamp(max=block_size).to(torch.float32)


def _visible(mq: int, nk: int, is_causal: bool, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(visible, offset)`` ``[Mq, Nk]``: block pairs that may attend (causal: ``n <= m``), and ``m - n``."""
    offset = torch.arange(mq, device=device)[:, None] - torch.arange(nk, device=device)[None, :]
    visible = offset >= 0 if is_causal else torch.ones_like(offset, dtype=torch.bool)
    return visible, offset


def pooled_estimate(query: Tensor, key: Tensor, block_size: int, is_causal: bool, scale: float) -> Tensor:
    """Estimated block attention mass ``[B, H, Mq, Nk]`` (rows sum to 1 over visible blocks)."""
    heads, kv_heads = query.shape[1], key.shape[1]
    q_len, kv_len = query.shape[-2], key.shape[-2]
    q_sum, k_sum = _block_sums(query, block_size), _block_sums(key, block_size)
    mq, nk = q_sum.shape[-2], k_sum.shape[-2]
    q_mean = q_sum / _block_sizes(q_len, mq, block_size, query.device)[:, None]
    k_count = _block_sizes(kv_len, nk, block_size, key.device)
    k_mean = (k_sum / k_count[:, None]).repeat_interleave(heads // kv_heads, dim=1)
    visible, offset = _visible(mq, nk, is_causal, query.device)
    # A causal diagonal block shows each query about half of its keys.
    keys_seen = torch.where((offset == 0) & is_causal, (k_count[None, :] + 1) / 2, k_count[None, :])
    logits = torch.einsum("bhmd,bhnd->bhmn", q_mean, k_mean) * scale + keys_seen.log()
    return torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)


def last_block_estimate(query: Tensor, key: Tensor, block_size: int, is_causal: bool, scale: float) -> Tensor:
    """Estimated block mass ``[B, H, Mq, Nk]`` from the exact attention of the last query block: its mass per
    key block (a column score) and per block offset (a diagonal score), extended to every query block."""
    heads, kv_heads = query.shape[1], key.shape[1]
    q_len, kv_len = query.shape[-2], key.shape[-2]
    rows = min(block_size, q_len)
    last_q = query[:, :, q_len - rows:].to(torch.float32)
    k = key.to(torch.float32).repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("bhid,bhjd->bhij", last_q, k) * scale
    q_pos = torch.arange(q_len - rows, q_len, device=query.device)[:, None]
    k_pos = torch.arange(kv_len, device=query.device)[None, :]
    if is_causal:
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    probs = torch.softmax(scores, dim=-1).mean(-2)  # [B, H, Lk]: mass per key
    nk = (kv_len + block_size - 1) // block_size
    mq = (q_len + block_size - 1) // block_size
    column = F.pad(probs, (0, nk * block_size - kv_len)).unflatten(-1, (nk, block_size)).sum(-1)
    # Mass by block offset, seen from the last query block: offset d = (mq - 1) - n.
    diagonal = column.flip(-1)
    visible, offset = _visible(mq, nk, is_causal, query.device)
    diag_score = diagonal[..., offset.clamp(0, nk - 1)]
    estimate = (column[..., None, :] + diag_score).masked_fill(~visible, 0.0)
    return estimate / estimate.sum(-1, keepdim=True).clamp_min(EPS)


def _dam_threshold(estimate: Tensor, visible: Tensor, tau: float, box_cox_lambda: float) -> Tensor:
    """Box-Cox, shift to minimum 0 per head map, threshold: bool ``[B, H, Mq, Nk]``."""
    # float32 like the estimate: this runs inside the compiled graph on every call.
    return (shifted_box_cox(estimate, box_cox_lambda, torch.float32) >= tau) & visible


def _block_patterns(mask: Tensor, visible: Tensor, offset: Tensor, mu: float) -> Tensor:
    """Blocks on block diagonals / columns where at least ``mu`` of the visible blocks are in ``mask``."""
    mq, nk = mask.shape[-2:]
    hits = mask.to(torch.float32)
    # Per offset d = m - n (shifted by nk - 1 to be >= 0): fraction of its visible blocks in the mask.
    index = (offset + nk - 1).expand_as(hits).reshape(*hits.shape[:-2], -1)
    slots = mq + nk - 1
    per_offset = hits.new_zeros((*hits.shape[:-2], slots)).scatter_add(-1, index, hits.flatten(-2))
    offset_size = hits.new_zeros(slots).scatter_add(0, (offset + nk - 1).flatten(), visible.flatten().float())
    diag_keep = per_offset >= mu * offset_size.clamp_min(1)
    diag = diag_keep.gather(-1, index).view_as(mask)
    col_keep = hits.sum(-2) >= mu * visible.sum(-2).clamp_min(1)
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
    density: float = 0.15,
    mass_target: float = 0.95,
    sink_blocks: int = 1,
    local_blocks: int = 2,
    estimator: str = "pooled",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The dynamic DAM plan for query ``[B, H, Lq, E]`` and key ``[B, KVH, Lk, E]``.

    Returns ``(kv_num_blocks [B, H, Mq], kv_indices [B, H, Mq, K], full_kv_num_blocks, full_kv_indices)``
    (int32, :class:`BlockSparsePlan` layout; partial blocks are those the causal diagonal cuts), with
    ``K = min(Nk, ceil(density * Nk) + sink_blocks + local_blocks)``."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    estimate_fn = pooled_estimate if estimator == "pooled" else last_block_estimate
    estimate = estimate_fn(query, key, block_size, is_causal, scale)
    mq, nk = estimate.shape[-2:]
    device = query.device
    visible, offset = _visible(mq, nk, is_causal, device)

    dam = _dam_threshold(estimate, visible, tau, box_cox_lambda)
    dam = dam | _block_patterns(dam, visible, offset, mu)
    local = (offset >= 0) & (offset < local_blocks) if is_causal else offset.abs() < local_blocks
    always = visible & ((torch.arange(nk, device=device) < sink_blocks)[None, :] | local)
    priority = torch.where(always, _ALWAYS, torch.where(dam, _DAM, 0.0)) + estimate

    budget = _row_budgets(visible, always, density)
    width = dynamic_plan_width(nk, density, sink_blocks, local_blocks)
    top_priority, top_index = priority.topk(width, dim=-1)
    top_mass = estimate.gather(-1, top_index)
    mass_before = top_mass.cumsum(-1) - top_mass
    rank = torch.arange(width, device=device)
    chosen = (top_priority >= _DAM) | (mass_before < mass_target)
    chosen = chosen & (rank < budget[:, None]) & visible.expand_as(priority).gather(-1, top_index)
    whole = (offset > 0) if is_causal else visible
    is_whole = whole.expand_as(priority).gather(-1, top_index)
    return (*_sorted_list(chosen & ~is_whole, top_index), *_sorted_list(chosen & is_whole, top_index))


def dynamic_plan_width(nk: int, density: float, sink_blocks: int, local_blocks: int) -> int:
    """Width ``K`` of the dynamic plan's index lists for ``nk`` key blocks (works on symbolic sizes too)."""
    return torch.sym_min(nk, (nk * math.ceil(density * 1000) + 999) // 1000 + sink_blocks + local_blocks)


def _row_budgets(visible: Tensor, always: Tensor, density: float) -> Tensor:
    """Blocks each query-block row may keep, int64 ``[Mq]``: the head keeps at most ``density`` of its visible
    blocks in all (when the always-kept blocks fit in that), each row its always-kept blocks plus a share of
    the rest proportional to its other visible blocks (short early rows would otherwise round up to more)."""
    seen, forced = visible.sum(-1).to(torch.float64), always.sum(-1).to(torch.float64)
    spare = (torch.floor(seen.sum() * density) - forced.sum()).clamp_min(0.0)
    optional = seen - forced
    extra = torch.floor(spare * optional / optional.sum().clamp_min(1.0))
    return (forced + extra).to(torch.int64)


def _sorted_list(selected: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """Counts and ascending index lists (selected first) from a ``[..., K]`` selection."""
    big = torch.iinfo(torch.int32).max
    ordered = torch.where(selected, index, big).sort(-1).values
    counts = selected.sum(-1, dtype=torch.int32)
    return counts, torch.where(ordered == big, 0, ordered).to(torch.int32)
