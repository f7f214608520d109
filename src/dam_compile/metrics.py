"""Fidelity measures of a block-sparse plan against full attention, computed in query-row chunks (memory
``O(rows x kv_len)``, never ``q_len x kv_len``).

- :func:`attention_mass_recall`: the fraction of the exact softmax mass that the plan keeps, per (batch, head);
- :func:`density_per_head`: kept blocks over the blocks dense attention visits (from the kernels' reference);
- :func:`output_error`: relative error of an attention output against a reference;
- :func:`top_mass_plan`: the oracle plan (the blocks holding the most exact mass, per row budget).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .plan.arith import softmax_scale
from .plan.block_plan import BlockSparsePlan, num_blocks
from .plan.structured_plans import causal_block_tables
from .plan.reference import (
    DEFAULT_MAX_CHUNK_ELEMENTS,
    TokenTables,
    check_heads,
    density_per_head,
    rows_per_chunk,
    score_chunks,
)


def attention_mass_recall(
    query: Tensor,
    key: Tensor,
    plan: BlockSparsePlan,
    *,
    is_causal: bool,
    scale: float | None = None,
    enable_gqa: bool = False,
    q_offset: int = 0,
    attn_mask: Tensor | None = None,
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
) -> Tensor:
    """Mean over query rows of the exact attention probability mass on keys the plan keeps.

    Args:
        query: ``[B, H, Lq, E]``; key ``[B, KVH, Lk, E]``.
        plan: the plan to score (token patterns included).
        is_causal, scale, enable_gqa, q_offset: as for the attention the plan serves.
        attn_mask: the attention's own mask, bool (``True`` = attend) or additive float (values at the dtype's
            minimum mean masked), broadcastable to ``[B, H, Lq, Lk]``; rows it leaves without any key (padding)
            are not counted.

    Returns:
        float64 ``[B, H]`` in ``[0, 1]`` (1.0: the plan keeps all the mass, as dense attention does).
    """
    batch, heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    check_heads(heads, kv_heads, enable_gqa)
    plan.validate(batch=batch, heads=heads, q_len=q_len, kv_len=kv_len)
    scale = softmax_scale(scale, head_dim)
    tables = TokenTables.build(plan, q_len, kv_len, is_causal, q_offset, None)
    k_pos = torch.arange(kv_len, device=query.device)
    kept_mass = torch.zeros((batch, heads), dtype=torch.float64, device=query.device)
    seen_rows = torch.zeros((batch, heads), dtype=torch.float64, device=query.device)
    mask = None if attn_mask is None else attn_mask.expand(batch, heads, q_len, kv_len)  # a view
    rows = rows_per_chunk(batch, heads, kv_len, plan.block_size, max_chunk_elements)
    for start, stop, scores in score_chunks(query, key, scale, rows, torch.float32):
        q_pos = torch.arange(start, stop, device=query.device)
        if is_causal:
            scores = scores.masked_fill(k_pos[None, :] > (q_pos[:, None] + q_offset), float("-inf"))
        if mask is not None:
            scores = _masked_scores(scores, mask[:, :, start:stop])
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        allowed = tables.allowed(q_pos, k_pos)
        kept_mass += (probs * allowed).sum((-2, -1), dtype=torch.float64)
        seen_rows += (probs.sum(-1) > 0).sum(-1, dtype=torch.float64)
    return kept_mass / seen_rows.clamp_min(1.0)


def _masked_scores(scores: Tensor, mask: Tensor) -> Tensor:
    """``scores`` with an SDPA mask applied; a float mask's values at its dtype's minimum mask fully (HF writes
    masked keys so), so a row of padding sees no key instead of all of them."""
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, float("-inf"))
    blocked = mask <= torch.finfo(mask.dtype).min / 2
    return (scores + mask.to(scores.dtype)).masked_fill(blocked, float("-inf"))


def top_mass_plan(query: Tensor, key: Tensor, block_size: int, budget: Tensor) -> BlockSparsePlan:
    """The oracle plan: in each query-block row the ``budget`` key blocks holding the most exact attention mass
    (causal attention; an upper bound for any mask at that density).

    Args:
        query: ``[B, H, L, E]``; key ``[B, KVH, L, E]`` (grouped heads allowed).
        budget: int ``[B, H, Mq]`` (or broadcastable): blocks to keep per query-block row.
    """
    b, h, n, d = query.shape
    nb = num_blocks(n, block_size)
    mass = torch.zeros(b, h, nb, nb, dtype=torch.float32, device=query.device)
    k_pos = torch.arange(n, device=query.device)
    rows = rows_per_chunk(b, h, n, block_size, DEFAULT_MAX_CHUNK_ELEMENTS)
    for start, stop, scores in score_chunks(query, key, softmax_scale(None, d), rows, torch.float32):
        q_pos = torch.arange(start, stop, device=query.device)
        scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
        probs = torch.nn.functional.pad(torch.softmax(scores, -1), (0, nb * block_size - n))
        mass.index_add_(2, q_pos // block_size, probs.unflatten(-1, (nb, block_size)).sum(-1))
    visible, whole = causal_block_tables(n, n, block_size, True, query.device)
    rank = mass.masked_fill(~visible, -1.0).argsort(-1, descending=True).argsort(-1)
    kept = (rank < budget[..., None]) & visible
    return BlockSparsePlan.from_block_tables(kept & ~whole, block_size, kept & whole)


def output_error(output: Tensor, reference: Tensor) -> float:
    """``||output - reference|| / ||reference||`` in float64 (Frobenius norms)."""
    if output.shape != reference.shape:
        raise ValueError(f"output {tuple(output.shape)} and reference {tuple(reference.shape)} differ in shape")
    ref = reference.to(torch.float64)
    return float((output.to(torch.float64) - ref).norm() / ref.norm().clamp_min(1e-300))


__all__ = ["attention_mass_recall", "density_per_head", "output_error", "top_mass_plan"]
