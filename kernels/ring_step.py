"""One step of ring (context-parallel) attention over a block-sparse plan.

Ring attention gives each rank a shard of the queries and passes the key/value shards around the ranks; each
step attends the local queries (or a part of them) to the received keys and returns the output with its
log-sum-exp, and the ring merges the steps by their log-sum-exps. Here a step is our op on the received shard:

- ``dam::sparse_attention_lse``: block-sparse attention that also returns the log-sum-exp ``[B, H, Lq]``
  (float32; ``-inf`` and zeros for a row that keeps no key, which the merge ignores);
- :func:`step_plan`: the step's plan, cut from the kept key blocks of the rank's query blocks over the whole
  sequence (``rows [B, H, Mq_local, Nk_global]``, from the same plan one process would build) to the step's
  query and key blocks. Shards are whole blocks; a block the plan keeps is partial (the causal test applies)
  only on the global diagonal. ``None`` when the step keeps nothing: the ring skips its compute.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .block_sparse_launch import triton_block_sparse_attention
from .dispatch import choose_path
from .lean_op import lean_op
from .plan import BlockSparsePlan
from .reference import block_sparse_attention_reference


@lean_op("dam::sparse_attention_lse")
def sparse_attention_lse_op(
    query: Tensor, key: Tensor, value: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor,
    full_kv_num_blocks: Optional[Tensor], full_kv_indices: Optional[Tensor], scale: Optional[float],
    is_causal: bool, enable_gqa: bool, block_size: int, kernel: str,
) -> tuple[Tensor, Tensor]:
    """``(out [B, H, Lq, Ev], lse [B, H, Lq] float32)`` of ``query [B, H, Lq, E]`` over the plan's blocks of
    ``key``/``value [B, KVH, Lk, E]``: the fused kernel where it runs, else the PyTorch reference (a ring step
    needs the log-sum-exp, which dense SDPA does not give)."""
    plan = BlockSparsePlan(kv_num_blocks, kv_indices, block_size, full_kv_num_blocks, full_kv_indices)
    options = dict(scale=scale, is_causal=is_causal, enable_gqa=enable_gqa)
    if choose_path(query, key, 0, kernel)[0] == "triton":
        return triton_block_sparse_attention(query, key, value, plan, check_plan=False, return_lse=True, **options)
    out, lse = block_sparse_attention_reference(query, key, value, plan, return_lse=True, **options)
    return out.contiguous(), lse.to(torch.float32)


@sparse_attention_lse_op.register_fake
def _(query, key, value, *args) -> tuple[Tensor, Tensor]:
    out = query.new_empty((*query.shape[:3], value.shape[-1]))
    return out, query.new_empty(query.shape[:3], dtype=torch.float32)


def sparse_attention_lse(query: Tensor, key: Tensor, value: Tensor, plan: BlockSparsePlan, *,
                         scale: float | None = None, is_causal: bool = False, enable_gqa: bool = False,
                         kernel: str = "auto") -> tuple[Tensor, Tensor]:
    """``(out, lse)`` through ``torch.ops.dam.sparse_attention_lse`` (block-level plans: no token pattern)."""
    if plan.token_diagonals is not None:
        raise ValueError("plan: a ring step takes block-level plans; token patterns are not supported")
    return sparse_attention_lse_op(query, key, value, plan.kv_num_blocks, plan.kv_indices, plan.full_kv_num_blocks,
                                   plan.full_kv_indices, scale, is_causal, enable_gqa, plan.block_size, kernel)


def step_plan(rows: Tensor, q_rows: Tensor, q_blocks: Tensor, k_blocks: Tensor, block_size: int
              ) -> BlockSparsePlan | None:
    """The plan of one ring step: of ``rows`` (bool ``[B, H, Mq, Nk]``: the kept global key blocks of each of the
    rank's query blocks, in the rank's order), the rows ``q_rows [Mq_step]`` (the step's query blocks, as
    indices into the rank's), whose global block indices are ``q_blocks [Mq_step]``, and the columns
    ``k_blocks [Nk_step]`` (the step's key blocks, global indices, in the order of its keys). Blocks on the
    global diagonal are partial (the step runs causal), the others full. ``None`` when the step keeps no
    block."""
    table = rows[:, :, q_rows][..., k_blocks]  # [B, H, Mq_step, Nk_step]
    if not bool(table.any()):
        return None
    diagonal = q_blocks[:, None] == k_blocks[None, :]
    return BlockSparsePlan.from_block_tables(table & diagonal, block_size, table & ~diagonal)


def blocks_of(positions: Tensor, block_size: int) -> Tensor:
    """The global block index of each whole block of token ``positions`` (one entry per ``block_size`` tokens,
    which must be consecutive within each block)."""
    if positions.numel() % block_size:
        raise ValueError(f"ring shards must be whole blocks of {block_size} tokens, got {positions.numel()}")
    return torch.div(positions[::block_size], block_size, rounding_mode="floor")
