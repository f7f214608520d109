"""Plain-PyTorch block-sparse attention: the CPU path and the oracle for the Triton kernel.

It computes exactly what ``torch.ops.dam.sparse_attention`` computes on its sparse path: softmax attention
restricted to the plan's kept key blocks, with in-block causal masking on partial blocks only, any
``attn_mask`` of ``scaled_dot_product_attention``, GQA and a custom scale. Query rows are processed in chunks
so no tensor grows with ``q_len * kv_len``: memory stays ``O(max_chunk_elements + inputs)``.

A query row that keeps no key at all returns zeros (as ``scaled_dot_product_attention``'s math path does for
fully masked rows), never NaN.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .plan import BlockSparsePlan, num_blocks
from .structured_plans import causal_block_tables

DEFAULT_MAX_CHUNK_ELEMENTS = 1 << 24


def rows_per_chunk(batch: int, heads: int, kv_len: int, block_size: int, max_chunk_elements: int) -> int:
    """Query rows per chunk so that one chunk's scores ``[batch, heads, rows, kv_len]`` stay within
    ``max_chunk_elements`` (at least one block of rows; whole blocks so block lookups stay aligned)."""
    per_row = max(1, batch * heads * kv_len)
    blocks = max(1, max_chunk_elements // (per_row * block_size))
    return blocks * block_size


def block_sparse_attention_reference(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    plan: BlockSparsePlan,
    *,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
    is_causal: bool = False,
    enable_gqa: bool = False,
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
) -> Tensor:
    """Block-sparse attention in PyTorch.

    Args:
        query: ``[B, H, Lq, E]``.
        key: ``[B, KVH, Lk, E]``; ``H`` must be a multiple of ``KVH`` (``KVH < H`` needs ``enable_gqa``).
        value: ``[B, KVH, Lk, Ev]``.
        plan: kept key blocks per query block (see :class:`BlockSparsePlan`), validated here.
        attn_mask: bool (``True`` = attend) or float (added to scores), broadcastable to ``[B, H, Lq, Lk]``.
        scale: score scale, ``1 / sqrt(E)`` when ``None``.
        is_causal: top-left aligned causal masking inside partial blocks, as SDPA's ``is_causal``.
        max_chunk_elements: bound on the scores held at once.

    Returns:
        ``[B, H, Lq, Ev]`` in ``query.dtype``, contiguous. Arithmetic in float32 (float64 for float64 inputs).
    """
    batch, heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    if heads % kv_heads != 0 or (heads != kv_heads and not enable_gqa):
        raise ValueError(f"query heads ({heads}) and key heads ({kv_heads}) need enable_gqa and H % KVH == 0")
    plan.validate(batch=batch, heads=heads, q_len=q_len, kv_len=kv_len)
    group = heads // kv_heads
    block = plan.block_size
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale

    out = torch.full((batch, heads, q_len, value.shape[-1]), float("nan"), dtype=query.dtype, device=query.device)
    partial, full = plan.block_tables(kv_len)
    k = key.to(compute)
    v = value.to(compute)
    mask = None if attn_mask is None else attn_mask.expand(batch, heads, q_len, kv_len)
    k_pos = torch.arange(kv_len, device=query.device)
    rows = rows_per_chunk(batch, heads, kv_len, block, max_chunk_elements)

    for start in range(0, q_len, rows):
        stop = min(start + rows, q_len)
        q_pos = torch.arange(start, stop, device=query.device)
        allowed = _allowed(partial, full, q_pos, k_pos, block, is_causal).expand(batch, heads, -1, -1)

        q = query[:, :, start:stop].to(compute).unflatten(1, (kv_heads, group))
        scores = torch.einsum("bkgre,bkne->bkgrn", q, k).flatten(1, 2) * scale
        if mask is not None:
            rows_mask = mask[:, :, start:stop]
            if rows_mask.dtype == torch.bool:
                allowed = allowed & rows_mask
            else:
                scores = scores + rows_mask.to(compute)
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[:, :, start:stop] = _safe_softmax_matmul(scores, v, kv_heads, group).to(query.dtype)
    return out


def _allowed(
    partial: Tensor, full: Tensor, q_pos: Tensor, k_pos: Tensor, block_size: int, is_causal: bool
) -> Tensor:
    """Token-level view of the block tables for query rows ``q_pos``: bool ``[Bp, Hp, R, Lk]``. Partial
    blocks get the causal test; full blocks are visible as a whole."""
    q_block, k_block = q_pos // block_size, k_pos // block_size
    allowed = partial[:, :, q_block][..., k_block]
    if is_causal:
        allowed = allowed & (k_pos[None, :] <= q_pos[:, None])
    return allowed | full[:, :, q_block][..., k_block]


def _safe_softmax_matmul(scores: Tensor, value: Tensor, kv_heads: int, group: int) -> Tensor:
    """softmax(scores) @ value with fully masked rows giving zeros. scores ``[B, H, R, Lk]``."""
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    weights = weights / torch.where(total > 0, total, torch.ones_like(total))
    weights = weights.unflatten(1, (kv_heads, group))
    return torch.einsum("bkgrn,bknd->bkgrd", weights, value).flatten(1, 2)


def token_mask(plan: BlockSparsePlan, q_len: int, kv_len: int, is_causal: bool) -> Tensor:
    """The plan expanded to a boolean ``[Bp, Hp, q_len, kv_len]`` token mask (``True`` = attend), with causal
    masking applied inside partial blocks. Materialises ``q_len * kv_len``: for tests and small inputs."""
    partial, full = plan.block_tables(kv_len)
    device = partial.device
    return _allowed(
        partial, full, torch.arange(q_len, device=device), torch.arange(kv_len, device=device),
        plan.block_size, is_causal,
    )


def plan_density(plan: BlockSparsePlan, q_len: int, kv_len: int, is_causal: bool) -> float:
    """Kept blocks over the blocks that dense attention would visit (all causal-visible blocks)."""
    visible, _ = causal_block_tables(q_len, kv_len, plan.block_size, is_causal, plan.kv_num_blocks.device)
    kept = plan.kept_blocks().sum().item()
    heads_batches = plan.kv_num_blocks.shape[0] * plan.kv_num_blocks.shape[1]
    return kept / max(1, int(visible.sum().item()) * heads_batches)


__all__ = [
    "block_sparse_attention_reference",
    "num_blocks",
    "plan_density",
    "rows_per_chunk",
    "token_mask",
]
