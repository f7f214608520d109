"""Decompositions of the ``dam::`` ops into ATen, for exporters and backends that do not know them.

``dam::sparse_attention`` becomes dense ``scaled_dot_product_attention`` with the plan expanded to a token mask
(``q_len x kv_len``: what the fused kernel avoids, so use these only where the op itself cannot run). The plan
ops become the PyTorch code they run (``dam::last_rows_block_lse``, which the dynamic plan calls, its
reference). Every decomposition computes what the op computes on the CPU, including
the run-time choice of the dense path for short inputs.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from . import attention as ops
from .dispatch import choose_path
from .key_padding import key_padding_op, key_padding_unknown
from dam_compile.kernels.last_rows_lse import last_rows_block_lse_reference, sampled_rows_block_lse_reference
from dam_compile.plan.block_plan import BlockSparsePlan
from dam_compile.plan.reference import token_mask


def sparse_attention_as_masked_sdpa(
    query: Tensor, key: Tensor, value: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor,
    full_kv_num_blocks: Optional[Tensor], full_kv_indices: Optional[Tensor], token_diagonals: Optional[Tensor],
    token_columns: Optional[Tensor], token_corner: Optional[Tensor], attn_mask: Optional[Tensor],
    scale: Optional[float], is_causal: bool, enable_gqa: bool, block_size: int, min_seq_len: int, kernel: str,
    kv_range: Optional[Tensor] = None, q_offset: int = 0, padding_kind: Optional[Tensor] = None,
) -> Tensor:
    """``dam::sparse_attention`` as SDPA: ``[B, H, Lq, E]`` -> ``[B, H, Lq, Ev]``. A key padding the pass
    described (``padding_kind``) is read from its row, ``attn_mask``: exact for any padding, with no host read."""
    if padding_kind is not None:
        kv_range = None
    path, _ = choose_path(query, key, min_seq_len, kernel)
    if path == "dense":
        return ops.dense_attention(query, key, value, attn_mask, scale, is_causal, enable_gqa)
    if kv_range is not None or q_offset != 0:
        raise ValueError("kv_range and q_offset: the decomposition covers the graphs the pass writes, which set "
                         "neither")
    plan = BlockSparsePlan(kv_num_blocks, kv_indices, block_size, full_kv_num_blocks, full_kv_indices,
                           token_diagonals, token_columns, token_corner)
    allowed = token_mask(plan, query.shape[-2], key.shape[-2], is_causal)  # [Bp, Hp, Lq, Lk]
    if attn_mask is not None:
        allowed = allowed & (attn_mask if attn_mask.dtype == torch.bool else attn_mask > torch.finfo(attn_mask.dtype).min)
    if enable_gqa and key.shape[1] != query.shape[1]:
        group = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    bias = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill(~allowed, float("-inf"))
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        bias = bias + attn_mask
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scale)
    return out.nan_to_num(0.0).contiguous()  # a row that keeps no key: 0, as the op returns


def decomposition_table() -> dict[Any, Callable]:
    """``{dam op overload: ATen-level function}`` for ``ExportedProgram.run_decompositions``."""
    table: dict[Any, Callable] = {torch.ops.dam.sparse_attention.default: sparse_attention_as_masked_sdpa}
    for op in (ops.dense_plan_op, ops.streaming_plan_op, ops.pattern_plan_op, ops.dynamic_plan_op, ops.decode_plan_op):
        table[op.opoverload] = op.fn
    table[key_padding_op.opoverload] = key_padding_unknown
    table[torch.ops.dam.last_rows_block_lse.default] = last_rows_block_lse_reference
    table[torch.ops.dam.sampled_rows_block_lse.default] = sampled_rows_block_lse_reference
    return table
