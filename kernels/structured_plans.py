"""Plans with a fixed structure, built from lengths alone: all causal blocks, and sink + local window.

Both are broadcast over batch and heads (``[1, 1, Mq, ...]``) and split kept blocks into partial blocks (those
touching the causal diagonal) and full blocks (entirely visible), so the kernel masks only the diagonal.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .plan import BlockSparsePlan, num_blocks


def causal_block_tables(
    q_len: int, kv_len: int, block_size: int, is_causal: bool, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Boolean ``(visible, full)`` tables ``[Mq, Nk]``: a key block is visible when some query of the query
    block may see some key of it, full when every query sees every (existing) key of it."""
    mq, nk = num_blocks(q_len, block_size), num_blocks(kv_len, block_size)
    if not is_causal:
        every = torch.ones((mq, nk), dtype=torch.bool, device=device)
        return every, every.clone()
    q_first = torch.arange(mq, device=device) * block_size
    q_last = torch.clamp(q_first + block_size, max=q_len) - 1
    k_first = torch.arange(nk, device=device) * block_size
    k_last = torch.clamp(k_first + block_size, max=kv_len) - 1
    visible = k_first[None, :] <= q_last[:, None]
    full = k_last[None, :] <= q_first[:, None]
    return visible, full


def dense_plan(
    q_len: int, kv_len: int, block_size: int, is_causal: bool, device: torch.device | str = "cpu"
) -> BlockSparsePlan:
    """Every block the attention can see (density 1.0): equal to dense attention."""
    visible, full = causal_block_tables(q_len, kv_len, block_size, is_causal, device)
    return _broadcast_plan(visible & ~full, full, block_size)


def streaming_plan(
    q_len: int,
    kv_len: int,
    block_size: int,
    is_causal: bool,
    sink_blocks: int,
    local_blocks: int,
    device: torch.device | str = "cpu",
) -> BlockSparsePlan:
    """StreamingLLM-style plan: the first ``sink_blocks`` key blocks plus a window of ``local_blocks`` key
    blocks ending at the query block's diagonal (centred on it when not causal)."""
    visible, full = causal_block_tables(q_len, kv_len, block_size, is_causal, device)
    mq, nk = visible.shape
    m = torch.arange(mq, device=device)[:, None]
    n = torch.arange(nk, device=device)[None, :]
    sink = n < sink_blocks
    if is_causal:
        local = (n <= m) & (n > m - local_blocks)
    else:
        local = (n - m).abs() < local_blocks
    kept = visible & (sink | local)
    return _broadcast_plan(kept & ~full, kept & full, block_size)


def _broadcast_plan(partial: Tensor, full: Tensor, block_size: int) -> BlockSparsePlan:
    return BlockSparsePlan.from_block_tables(partial[None, None], block_size, full[None, None])
