"""Plans with a fixed structure, built from lengths alone: all causal blocks, and sink + local window (the
benchmarks' random and density-matched plans are ``benchmarks/bench_plans.py``'s).

Every plan here splits kept blocks into partial blocks (those touching the causal diagonal) and full blocks
(entirely visible), so the kernel masks only the diagonal; the fixed ones are broadcast over batch and heads
(``[1, 1, Mq, ...]``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .block_plan import BlockSparsePlan, num_blocks


def causal_block_tables(
    q_len: int,
    kv_len: int,
    block_size: int,
    is_causal: bool,
    device: torch.device | str = "cpu",
    *,
    q_offset: int = 0,
) -> tuple[Tensor, Tensor]:
    """Boolean ``(visible, full)`` tables ``[Mq, Nk]``: a key block is visible when some query of the query
    block may see some key of it, full when every query sees every (existing) key of it. Query row ``i`` sits
    at key position ``i + q_offset``."""
    if not is_causal:
        mq, nk = num_blocks(q_len, block_size), num_blocks(kv_len, block_size)
        every = torch.ones((mq, nk), dtype=torch.bool, device=device)
        return every, every.clone()
    q_first, q_last, k_first, k_last = block_token_ranges(q_len, kv_len, block_size, device, q_offset=q_offset)
    visible = k_first[None, :] <= q_last[:, None]
    full = k_last[None, :] <= q_first[:, None]
    return visible, full


def block_token_ranges(
    q_len: int, kv_len: int, block_size: int, device: torch.device | str = "cpu", *, q_offset: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(q_first, q_last [Mq], k_first, k_last [Nk])``: the first and last key position of each query block's
    rows (row ``i`` at ``i + q_offset``) and the first and last key of each key block (the last ones ragged)."""
    q_first = torch.arange(num_blocks(q_len, block_size), device=device) * block_size
    q_last = torch.clamp(q_first + block_size, max=q_len) - 1 + q_offset
    k_first = torch.arange(num_blocks(kv_len, block_size), device=device) * block_size
    k_last = torch.clamp(k_first + block_size, max=kv_len) - 1
    return q_first + q_offset, q_last, k_first, k_last


def dense_plan(
    q_len: int,
    kv_len: int,
    block_size: int,
    is_causal: bool,
    device: torch.device | str = "cpu",
    *,
    q_offset: int = 0,
) -> BlockSparsePlan:
    """Every block the attention can see (density 1.0): equal to dense attention."""
    visible, full = causal_block_tables(q_len, kv_len, block_size, is_causal, device, q_offset=q_offset)
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
    kept = visible & streaming_window(m, n, sink_blocks, local_blocks, is_causal)
    return _broadcast_plan(kept & ~full, kept & full, block_size)


def streaming_window(m: Tensor, n: Tensor, sink_blocks: int, local_blocks: int, is_causal: bool) -> Tensor:
    """Whether query block ``m`` keeps key block ``n`` (broadcast) in a StreamingLLM plan: the first
    ``sink_blocks`` key blocks and a window of ``local_blocks`` ending at the diagonal (centred on it when not
    causal). What the attention can see is the caller's to apply."""
    sink = n < sink_blocks
    if is_causal:
        return sink | ((n <= m) & (n > m - local_blocks))
    return sink | ((n - m).abs() < local_blocks)


def _broadcast_plan(partial: Tensor, full: Tensor, block_size: int) -> BlockSparsePlan:
    return BlockSparsePlan.from_block_tables(partial[None, None], block_size, full[None, None])
