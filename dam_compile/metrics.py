"""Fidelity measures of a block-sparse plan against full attention, computed in query-row chunks (memory
``O(rows x kv_len)``, never ``q_len x kv_len``).

- :func:`attention_mass_recall`: the fraction of the exact softmax mass that the plan keeps, per (batch, head);
- :func:`density_per_head`: kept blocks over the blocks dense attention visits;
- :func:`output_error`: relative error of an attention output against a reference.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .kernels.plan import BlockSparsePlan
from .kernels.reference import DEFAULT_MAX_CHUNK_ELEMENTS, TokenTables, check_heads, rows_per_chunk
from .kernels.structured_plans import causal_block_tables


def attention_mass_recall(
    query: Tensor,
    key: Tensor,
    plan: BlockSparsePlan,
    *,
    is_causal: bool,
    scale: float | None = None,
    enable_gqa: bool = False,
    q_offset: int = 0,
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
) -> Tensor:
    """Mean over query rows of the exact attention probability mass on keys the plan keeps.

    Args:
        query: ``[B, H, Lq, E]``; key ``[B, KVH, Lk, E]``.
        plan: the plan to score (token patterns included).
        is_causal, scale, enable_gqa, q_offset: as for the attention the plan serves.

    Returns:
        float64 ``[B, H]`` in ``[0, 1]`` (1.0: the plan keeps all the mass, as dense attention does).
    """
    batch, heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    check_heads(heads, kv_heads, enable_gqa)
    plan.validate(batch=batch, heads=heads, q_len=q_len, kv_len=kv_len)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    group = heads // kv_heads
    tables = TokenTables.build(plan, q_len, kv_len, is_causal, q_offset, None)
    k = key.to(torch.float32)
    k_pos = torch.arange(kv_len, device=query.device)
    kept_mass = torch.zeros((batch, heads), dtype=torch.float64, device=query.device)
    rows = rows_per_chunk(batch, heads, kv_len, plan.block_size, max_chunk_elements)
    for start in range(0, q_len, rows):
        stop = min(start + rows, q_len)
        q_pos = torch.arange(start, stop, device=query.device)
        q = query[:, :, start:stop].to(torch.float32).unflatten(1, (kv_heads, group))
        scores = torch.einsum("bkgre,bkne->bkgrn", q, k).flatten(1, 2) * scale
        if is_causal:
            scores = scores.masked_fill(k_pos[None, :] > (q_pos[:, None] + q_offset), float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        allowed = tables.allowed(q_pos, k_pos)
        kept_mass += (probs * allowed).sum((-2, -1), dtype=torch.float64)
    return kept_mass / q_len


def density_per_head(plan: BlockSparsePlan, q_len: int, kv_len: int, is_causal: bool, q_offset: int = 0) -> Tensor:
    """float64 ``[Bp, Hp]``: kept blocks over the blocks dense attention would visit (all causal-visible)."""
    visible, _ = causal_block_tables(
        q_len, kv_len, plan.block_size, is_causal, plan.kv_num_blocks.device, q_offset=q_offset
    )
    return plan.kept_blocks().sum(-1).to(torch.float64) / max(1, int(visible.sum()))


def output_error(output: Tensor, reference: Tensor) -> float:
    """``||output - reference|| / ||reference||`` in float64 (Frobenius norms)."""
    if output.shape != reference.shape:
        raise ValueError(f"output {tuple(output.shape)} and reference {tuple(reference.shape)} differ in shape")
    ref = reference.to(torch.float64)
    return float((output.to(torch.float64) - ref).norm() / ref.norm().clamp_min(1e-300))
