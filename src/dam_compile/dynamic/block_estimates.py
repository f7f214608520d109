"""Block attention-mass estimates for the dynamic DAM plan, each ``[B, H, Mq, Nk]`` float32 with every row
summing to 1 over its visible key blocks (``Mq x Nk`` per head, ``block_size**2`` times smaller than the
attention). Plain PyTorch (the last queries' exact block mass through the ``dam::last_rows_block_lse`` Triton
op where it runs), no host sync, no data-dependent shapes.

- :func:`pooled_estimate`: softmax over key blocks of (mean query of the block) . (mean key of the block);
  query-aware but blind to a needle of a few tokens (the mean dilutes it by the block size).
- :func:`last_block_estimate` (MInference): the exact attention of the last query block, as per-key-block
  column mass and per-block-offset diagonal mass, extended to every row (vertical + slash lines).
- :func:`sampled_estimate` (the default): each query block's mean exact block mass over every
  ``SAMPLED_ROW_STRIDE``-th of its queries (the ``dam::sampled_rows_block_lse`` Triton op: an eighth of ``Q K^T``,
  reduced in registers), so every row's plan follows what its own queries attend to; the last query block is
  exact, as in the adaptive estimate.
- :func:`adaptive_estimate`: per head, FlexPrefill's choice between the two (pooled where the pooled estimate
  of the last block agrees with its exact mass, vertical-slash elsewhere), and the last query block row set to
  its exact mass (with the block before it when the last one is ragged); those rows also *need* every block
  that any of their queries needs to reach ``EXACT_ROW_MASS`` of its own attention: the rows that ask the
  question see what they really attend to, even when one query of the block asks it (a mean over the block's
  128 queries dilutes one query's needle below 1%).

Each returns a :class:`BlockEstimate`; ``estimators.py`` registers them by name.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from dam_compile.plan.block_plan import num_blocks
from dam_compile.plan.dam_patterns import EPS
from dam_compile.kernels.last_rows_lse import exact_query_rows, last_rows_block_lse, sampled_rows_block_lse

# Jensen-Shannon distance (the square root of the divergence in nats) under which a head's pooled estimate
# counts as agreeing with its exact last-block mass (FlexPrefill's query-aware test and threshold).
QUERY_AWARE_JS_DISTANCE = 0.1
# The sampled estimator averages the exact block mass of every this-many-th query of each query block (16 of a
# 128-query block): an eighth of Q K^T, where the block's mean over all its queries costs the whole matrix.
SAMPLED_ROW_STRIDE = 8
# Share of its own attention mass that each query with an exact estimate keeps (the adaptive estimator's last
# query block or two, a decode row): its mass is known, so a high target costs a row or two only.
EXACT_ROW_MASS = 0.99
# Where a plan ranks a block, above any mass estimate (which lies in [0, 1]): always-kept blocks (sink, local)
# first, then DAM-kept ones, then the rest by mass. Read by the definition (``dynamic_plan``) and the fused
# plan kernels alike, so both order rows the same way.
ALWAYS_PRIORITY, DAM_PRIORITY = 4.0, 2.0


class BlockEstimate(NamedTuple):
    """``mass``: float32 ``[B, H, Mq, Nk]``, each row summing to 1 over its visible blocks. ``needed``: bool
    ``[B, H, Mq, Nk]`` or ``None``: blocks a row is known to need (from exact scores), kept whatever the
    budget. ``exact``: bool ``[Mq]`` or ``None``: the rows whose mass is exact (they take their budget first)."""

    mass: Tensor
    needed: Tensor | None = None
    exact: Tensor | None = None


def block_sums(x: Tensor, block_size: int) -> Tensor:
    """``[..., L, D]`` -> float32 ``[..., ceil(L / block), D]`` sums over each block's rows."""
    length = x.shape[-2]
    blocks = num_blocks(length, block_size)
    # A view when the length is whole blocks: padding by nothing would still copy x (all of Q, for the plan).
    padded = x if length == blocks * block_size else F.pad(x, (0, 0, 0, blocks * block_size - length))
    return padded.unflatten(-2, (blocks, block_size)).sum(-2, dtype=torch.float32)


def block_sizes(length: int, blocks: int, block_size: int, device: torch.device) -> Tensor:
    """Tokens in each of ``blocks`` blocks (the last may be ragged), float32 ``[blocks]``."""
    starts = torch.arange(blocks, device=device) * block_size
    return (length - starts).clamp(max=block_size).to(torch.float32)


def visible_blocks(mq: int, nk: int, is_causal: bool, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(visible, offset)`` ``[Mq, Nk]``: block pairs that may attend (causal: ``n <= m``), and ``m - n``."""
    offset = torch.arange(mq, device=device)[:, None] - torch.arange(nk, device=device)[None, :]
    visible = offset >= 0 if is_causal else torch.ones_like(offset, dtype=torch.bool)
    return visible, offset


def pooled_estimate(query: Tensor, key: Tensor, block_size: int, is_causal: bool, scale: float) -> Tensor:
    """Estimated block attention mass ``[B, H, Mq, Nk]`` from mean-pooled query and key blocks."""
    heads, kv_heads = query.shape[1], key.shape[1]
    q_len, kv_len = query.shape[-2], key.shape[-2]
    q_sum, k_sum = block_sums(query, block_size), block_sums(key, block_size)
    mq, nk = q_sum.shape[-2], k_sum.shape[-2]
    q_mean = q_sum / block_sizes(q_len, mq, block_size, query.device)[:, None]
    k_count = block_sizes(kv_len, nk, block_size, key.device)
    k_mean = (k_sum / k_count[:, None]).repeat_interleave(heads // kv_heads, dim=1)
    visible, offset = visible_blocks(mq, nk, is_causal, query.device)
    # A causal diagonal block shows each query about half of its keys.
    keys_seen = torch.where((offset == 0) & is_causal, (k_count[None, :] + 1) / 2, k_count[None, :])
    logits = torch.einsum("bhmd,bhnd->bhmn", q_mean, k_mean) * scale + keys_seen.log()
    return torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)


def last_rows_mass(query: Tensor, key: Tensor, block_size: int, is_causal: bool, scale: float) -> Tensor:
    """Exact attention mass per key block of each of the last ``R = exact_query_rows(Lq, block_size)`` queries
    (the last query block; the two last when it is ragged): float32 ``[B, H, R, Nk]`` (each query's row sums
    to 1). Grouped K/V heads are read in place (no repeat: at 128K a
    repeated float copy of K would take gigabytes)."""
    batch, heads, q_len = query.shape[:3]
    block_lse = last_rows_block_lse(query, key, block_size, is_causal, scale)  # [B, KVH, G * R, Nk]
    mass = (block_lse - block_lse.logsumexp(-1, keepdim=True)).exp()
    return mass.view(batch, heads, exact_query_rows(q_len, block_size), -1)


def last_rows_block_mass(query: Tensor, key: Tensor, block_size: int, is_causal: bool, scale: float) -> Tensor:
    """Exact attention mass per key block, averaged over the last ``exact_query_rows(Lq, block_size)``
    queries: float32 ``[B, H, Nk]`` (sums to 1)."""
    return last_rows_mass(query, key, block_size, is_causal, scale).mean(-2)


def blocks_each_row_needs(row_mass: Tensor, target: float) -> Tensor:
    """bool ``[..., Nk]``: the union over rows of ``row_mass [..., R, Nk]`` of the fewest blocks holding
    ``target`` of each row's mass (its blocks by mass, largest first, until the target)."""
    ordered, order = row_mass.sort(dim=-1, descending=True)
    wanted = ((ordered.cumsum(-1) - ordered) < target) & (ordered > 0)
    return torch.zeros_like(wanted).scatter(-1, order, wanted).any(-2)


def vertical_slash(column: Tensor, mq: int, is_causal: bool) -> Tensor:
    """Column mass ``[B, H, Nk]`` seen from the last query block, extended to every row ``[B, H, Mq, Nk]``: each
    block scores its column's mass plus the mass at its block offset (offset ``d`` is key block ``Mq - 1 - d``
    from the last row), normalised per row."""
    nk = column.shape[-1]
    visible, offset = visible_blocks(mq, nk, is_causal, column.device)
    source = mq - 1 - offset  # the last row's key block at the same offset
    diagonal = column[..., source.clamp(0, nk - 1)].masked_fill(((source < 0) | (source >= nk)), 0.0)
    estimate = (column[..., None, :] + diagonal).masked_fill(~visible, 0.0)
    return estimate / estimate.sum(-1, keepdim=True).clamp_min(EPS)


def pooled_block_estimate(query: Tensor, key: Tensor, block_size: int, is_causal: bool,
                          scale: float) -> BlockEstimate:
    """:func:`pooled_estimate` as a :class:`BlockEstimate`."""
    return BlockEstimate(pooled_estimate(query, key, block_size, is_causal, scale))


def last_block_estimate(query: Tensor, key: Tensor, block_size: int, is_causal: bool, scale: float) -> BlockEstimate:
    """MInference-style estimate ``[B, H, Mq, Nk]``: the last query block's exact mass as vertical + slash."""
    mq = num_blocks(query.shape[-2], block_size)
    return BlockEstimate(vertical_slash(last_rows_block_mass(query, key, block_size, is_causal, scale), mq,
                                        is_causal))


def js_divergence(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon divergence (nats) of distributions along the last dim."""
    mid = 0.5 * (p + q)
    kl = lambda a: (a * (a.clamp_min(EPS) / mid.clamp_min(EPS)).log()).sum(-1)  # noqa: E731
    return 0.5 * (kl(p) + kl(q))


def adaptive_estimate(query: Tensor, key: Tensor, block_size: int, is_causal: bool, scale: float) -> BlockEstimate:
    """Per head the pooled (query-aware) or the vertical-slash estimate, whichever the exact mass of the last
    queries supports; the last rows exact (:func:`with_exact_last_rows`). ``[B, H, Mq, Nk]``."""
    row_mass = last_rows_mass(query, key, block_size, is_causal, scale)  # [B, H, R, Nk]
    column = row_mass.mean(-2)
    pooled = pooled_estimate(query, key, block_size, is_causal, scale)
    mq = pooled.shape[-2]
    query_aware = js_divergence(pooled[..., -1, :], column).clamp_min(0).sqrt() < QUERY_AWARE_JS_DISTANCE
    estimate = torch.where(query_aware[..., None, None], pooled, vertical_slash(column, mq, is_causal))
    return with_exact_last_rows(estimate, row_mass, query.shape[-2], block_size)


def sampled_rows_mass(query: Tensor, key: Tensor, block_size: int, is_causal: bool, scale: float,
                      per_block: int, block_map: Tensor | None = None) -> Tensor:
    """Exact attention mass per key block of ``per_block`` queries of every query block
    (:func:`sampled_query_positions`): float32 ``[B, H, Mq, per_block, Nk]`` (each query's row sums to 1).
    ``block_map``: the query blocks' places among the key blocks when the query is a shard of them."""
    batch, heads = query.shape[:2]
    block_lse = sampled_rows_block_lse(query, key, block_size, per_block, is_causal, scale, block_map)
    mass = (block_lse - block_lse.logsumexp(-1, keepdim=True)).exp()
    return mass.view(batch, heads, -1, per_block, mass.shape[-1])


def sampled_per_block(block_size: int) -> int:
    """Queries the sampled estimator scores in each query block: every ``SAMPLED_ROW_STRIDE``-th (at least one)."""
    return max(1, block_size // SAMPLED_ROW_STRIDE)


def sampled_estimate(query: Tensor, key: Tensor, block_size: int, is_causal: bool, scale: float) -> BlockEstimate:
    """Every query block's mass: the mean of the exact block mass of every ``SAMPLED_ROW_STRIDE``-th of its
    queries (its last query among them); the last rows exact (:func:`with_exact_last_rows`). ``[B, H, Mq, Nk]``."""
    estimate = sampled_rows_mass(query, key, block_size, is_causal, scale, sampled_per_block(block_size)).mean(-2)
    row_mass = last_rows_mass(query, key, block_size, is_causal, scale)
    return with_exact_last_rows(estimate, row_mass, query.shape[-2], block_size)


def with_exact_last_rows(estimate: Tensor, row_mass: Tensor, q_len: int, block_size: int) -> BlockEstimate:
    """``estimate [B, H, Mq, Nk]`` with the rows of the last queries (``row_mass [B, H, R, Nk]``, exact: the
    last query block; the two last when it is ragged, so a question split over them is covered) set to their
    exact mass; those rows need the blocks that hold ``EXACT_ROW_MASS`` of each of their queries' attention."""
    mq = estimate.shape[-2]
    # The exact queries by query block: the last block's, and the whole one before it when there are more.
    last_len = q_len - (mq - 1) * block_size
    groups = [row_mass[..., row_mass.shape[-2] - last_len:, :]]
    if row_mass.shape[-2] > last_len:
        groups.insert(0, row_mass[..., :row_mass.shape[-2] - last_len, :])
    exact = len(groups)
    # Built without in-place writes: export functionalizes this code.
    mass = torch.cat([estimate[..., :mq - exact, :], *(g.mean(-2, keepdim=True) for g in groups)], dim=-2)
    needed = torch.cat([torch.zeros_like(estimate[..., :mq - exact, :], dtype=torch.bool),
                        *(blocks_each_row_needs(g, EXACT_ROW_MASS)[..., None, :] for g in groups)], dim=-2)
    return BlockEstimate(mass, needed, torch.arange(mq, device=estimate.device) >= mq - exact)


def sampled_shard_estimate(query: Tensor, key: Tensor, block_size: int, scale: float, blocks: Tensor,
                           q_len: int) -> BlockEstimate:
    """:func:`sampled_estimate` of a context-parallel rank's query blocks: ``query [B, H, Mq_shard * block, E]``
    is blocks ``blocks`` (int64 ``[Mq_shard]``) of a causal ``q_len``-token sequence of whole blocks, against
    all of its keys. The rows are the whole sequence's estimate's: the sampled rows at their places, and the
    sequence's last query block (on the rank that holds it) exact."""
    per_block = sampled_per_block(block_size)
    estimate = sampled_rows_mass(query, key, block_size, True, scale, per_block, blocks).mean(-2)
    exact = blocks.to(estimate.device) == (q_len // block_size - 1)
    needed = torch.zeros_like(estimate, dtype=torch.bool)
    for row in exact.nonzero().flatten().tolist():  # at most one: the rank holding the prompt's end
        rows = sampled_rows_mass(query[:, :, row * block_size:(row + 1) * block_size], key, block_size, True, scale,
                                 block_size, blocks[row:row + 1])[..., 0, :, :]  # every query of the block
        estimate[..., row, :] = rows.mean(-2)
        needed[..., row, :] = blocks_each_row_needs(rows, EXACT_ROW_MASS)
    return BlockEstimate(estimate, needed, exact)
