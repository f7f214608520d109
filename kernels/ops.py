"""The ``torch.library`` custom ops that the graph pass inserts.

- ``dam::sparse_attention``: attention over a block-sparse plan; a drop-in for
  ``scaled_dot_product_attention`` (same argument meaning, no dropout) that picks its path at run time.
- ``dam::dense_plan`` / ``dam::streaming_plan`` / ``dam::pattern_plan`` (calibrated DAM): the
  mask-generation ops, producing the plan tensors. The dynamic DAM plan is plain PyTorch
  (:func:`dynamic_block_plan`) that Inductor compiles with the rest of the graph.

Each has a fake implementation so Dynamo, AOTAutograd and Inductor can trace it with symbolic shapes.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .block_sparse_launch import triton_block_sparse_attention
from .dispatch import choose_path, record
from .plan import BlockSparsePlan, num_blocks
from .reference import block_sparse_attention_reference
from .pattern_plan import cached_pattern_plan
from .structured_plans import dense_plan, streaming_plan

PlanTensors = tuple[Tensor, Tensor, Tensor, Tensor]


@torch.library.custom_op("dam::sparse_attention", mutates_args=())
def sparse_attention_op(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    kv_num_blocks: Tensor,
    kv_indices: Tensor,
    full_kv_num_blocks: Optional[Tensor],
    full_kv_indices: Optional[Tensor],
    token_diagonals: Optional[Tensor],
    token_columns: Optional[Tensor],
    token_corner: Optional[Tensor],
    attn_mask: Optional[Tensor],
    scale: Optional[float],
    is_causal: bool,
    enable_gqa: bool,
    block_size: int,
    min_seq_len: int,
    kernel: str,
    kv_range: Optional[Tensor] = None,
    q_offset: int = 0,
) -> Tensor:
    """Shapes: query ``[B, H, Lq, E]``, key ``[B, KVH, Lk, E]``, value ``[B, KVH, Lk, Ev]`` -> ``[B, H, Lq, Ev]``
    (contiguous). The plan tensors follow :class:`BlockSparsePlan`; ``kv_range`` and ``q_offset`` are those of
    :func:`triton_block_sparse_attention`. The dense path (decode, short inputs, no fused kernel) is SDPA and
    supports neither (``kv_range=None``, ``q_offset=0``), so callers that set them use ``min_seq_len=0``."""
    path, reason = choose_path(query, min_seq_len, kernel)
    record(path, reason)
    if path == "dense":
        if kv_range is not None or q_offset != 0:
            raise ValueError("kv_range and q_offset need the sparse path; this call runs dense: " + reason)
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
        ).contiguous()
    plan = BlockSparsePlan(
        kv_num_blocks, kv_indices, block_size, full_kv_num_blocks, full_kv_indices, token_diagonals, token_columns,
        token_corner,
    )
    options = dict(attn_mask=attn_mask, scale=scale, is_causal=is_causal, enable_gqa=enable_gqa,
                   kv_range=kv_range, q_offset=q_offset)
    if path == "triton":
        # The graph's own plan ops produced the plan: shapes are checked, index values trusted (no sync).
        return triton_block_sparse_attention(query, key, value, plan, check_plan=False, **options)
    return block_sparse_attention_reference(query, key, value, plan, **options).contiguous()


@sparse_attention_op.register_fake
def _(query, key, value, *args, **kwargs) -> Tensor:
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


@torch.library.custom_op("dam::dense_plan", mutates_args=())
def dense_plan_op(
    query: Tensor, key: Tensor, block_size: int, is_causal: bool, min_seq_len: int, kernel: str
) -> PlanTensors:
    """Every visible block of a ``[B, H, Lq, E]`` query against ``[B, KVH, Lk, E]`` keys (density 1.0)."""
    return _plan_unless_dense(
        query, key, block_size, min_seq_len, kernel,
        lambda: dense_plan(query.shape[-2], key.shape[-2], block_size, is_causal, query.device),
    )


@torch.library.custom_op("dam::streaming_plan", mutates_args=())
def streaming_plan_op(
    query: Tensor, key: Tensor, block_size: int, is_causal: bool, min_seq_len: int, kernel: str,
    sink_blocks: int, local_blocks: int,
) -> PlanTensors:
    """Sink + local-window blocks (see :func:`streaming_plan`)."""
    return _plan_unless_dense(
        query, key, block_size, min_seq_len, kernel,
        lambda: streaming_plan(
            query.shape[-2], key.shape[-2], block_size, is_causal, sink_blocks, local_blocks, query.device
        ),
    )


def _plan_unless_dense(
    query: Tensor, key: Tensor, block_size: int, min_seq_len: int, kernel: str, build: Callable[[], BlockSparsePlan]
) -> PlanTensors:
    """The plan, or, when ``dam::sparse_attention`` will take its dense path for this query (the same
    :func:`choose_path` rule), a valid plan that keeps nothing, built without launching a kernel per index."""
    path, _ = choose_path(query, min_seq_len, kernel)
    if path != "dense":
        plan = build()  # block-level sources: dense/streaming plans always carry full blocks, no pattern
        return plan.kv_num_blocks, plan.kv_indices, plan.full_kv_num_blocks, plan.full_kv_indices
    counts, indices, full_counts, full_indices = _uninitialized_broadcast_plan(query, key, block_size)
    return counts.zero_(), indices, full_counts.zero_(), full_indices


def _uninitialized_broadcast_plan(query: Tensor, key: Tensor, block_size: int, *args) -> PlanTensors:
    """Plan tensors of the right shapes (``[1, 1, Mq]``, ``[1, 1, Mq, Nk]``), contents unset: the plan ops'
    fake implementation, and the buffers of the keep-nothing plan."""
    mq, nk = num_blocks(query.shape[-2], block_size), num_blocks(key.shape[-2], block_size)
    return (
        query.new_empty((1, 1, mq), dtype=torch.int32),
        query.new_empty((1, 1, mq, nk), dtype=torch.int32),
        query.new_empty((1, 1, mq), dtype=torch.int32),
        query.new_empty((1, 1, mq, nk), dtype=torch.int32),
    )


dense_plan_op.register_fake(_uninitialized_broadcast_plan)
streaming_plan_op.register_fake(_uninitialized_broadcast_plan)


@torch.library.custom_op("dam::pattern_plan", mutates_args=())
def pattern_plan_op(
    query: Tensor, key: Tensor, diagonals: Tensor, columns: Tensor, corner: Tensor,
    block_size: int, is_causal: bool, min_seq_len: int, kernel: str,
) -> PlanTensors:
    """The calibrated DAM plan: the blocks of the extended mask of per-head patterns (``diagonals [H, R]``,
    ``columns [H, C]``, ``corner [H, P, P]``) for this query/key length, built once per length bucket. The
    block lists come out ``[1, H, Mq, Nk]`` wide (only the first ``counts`` entries are meaningful)."""
    path, _ = choose_path(query, min_seq_len, kernel)
    lists = _pattern_plan_buffers(query, key, diagonals, block_size)
    if path == "dense":
        lists[0].zero_()
        lists[2].zero_()
        return lists
    plan = cached_pattern_plan(
        diagonals, columns, corner, query.shape[-2], key.shape[-2], block_size, is_causal
    )
    for buffer, compact in zip(lists, (plan.kv_num_blocks, plan.kv_indices, plan.full_kv_num_blocks, plan.full_kv_indices)):
        buffer[..., : compact.shape[-1]].copy_(compact)
    return lists


def _pattern_plan_buffers(query: Tensor, key: Tensor, diagonals: Tensor, block_size: int, *args) -> PlanTensors:
    heads = diagonals.shape[0]
    mq, nk = num_blocks(query.shape[-2], block_size), num_blocks(key.shape[-2], block_size)
    counts = query.new_empty((1, heads, mq), dtype=torch.int32)
    indices = query.new_empty((1, heads, mq, nk), dtype=torch.int32)
    return counts, indices, torch.empty_like(counts), torch.empty_like(indices)


@pattern_plan_op.register_fake
def _(query, key, diagonals, columns, corner, block_size, *args) -> PlanTensors:
    return _pattern_plan_buffers(query, key, diagonals, block_size)


def sparse_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    plan: BlockSparsePlan,
    *,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
    is_causal: bool = False,
    enable_gqa: bool = False,
    kv_range: Tensor | None = None,
    q_offset: int = 0,
    min_seq_len: int = 0,
    kernel: str = "auto",
) -> Tensor:
    """Block-sparse attention through ``torch.ops.dam.sparse_attention``.

    Args:
        query: ``[B, H, Lq, E]``; key ``[B, KVH, Lk, E]``; value ``[B, KVH, Lk, Ev]``.
        plan: the kept key blocks (:class:`BlockSparsePlan`).
        attn_mask, scale, is_causal, enable_gqa: as in ``scaled_dot_product_attention``.
        kv_range: int32 ``[B, 2]``: per sequence the valid keys ``[start, end)`` (padding without a mask).
        q_offset: key position of query row 0 (``0``: SDPA's top-left alignment; ``Lk - Lq``: queries aligned
            to the end of the keys).
        min_seq_len: query lengths below this run dense attention.
        kernel: ``'auto'``, ``'triton'`` or ``'reference'`` (see :func:`choose_path`).

    Returns:
        ``[B, H, Lq, Ev]``.
    """
    return torch.ops.dam.sparse_attention(
        query, key, value, *plan.as_op_args(), attn_mask, scale, is_causal, enable_gqa,
        plan.block_size, min_seq_len, kernel, kv_range, q_offset,
    )
