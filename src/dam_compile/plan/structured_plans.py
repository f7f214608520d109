"""Plans with a fixed structure, built from lengths alone: all causal blocks, and sink + local window; and random
plans (a density, or a fixed count per row) for tests and benchmarks.

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
    sink = n < sink_blocks
    if is_causal:
        local = (n <= m) & (n > m - local_blocks)
    else:
        local = (n - m).abs() < local_blocks
    kept = visible & (sink | local)
    return _broadcast_plan(kept & ~full, kept & full, block_size)


def density_matched_streaming_plan(
    length: int, block_size: int, density: float, device: torch.device | str = "cpu"
) -> BlockSparsePlan:
    """The StreamingLLM baseline at about ``density`` of the causal-visible blocks of ``length`` tokens: one sink
    block plus a window sized to ``density`` of the average visible row (at least one block). Rows shorter than
    the window keep all they see, so at a high ``density`` the plan keeps somewhat less (0.26 for 0.29 at 8K)."""
    visible, _ = causal_block_tables(length, length, block_size, True, device)
    window = max(1, round(density * float(visible.sum(-1).float().mean())) - 1)
    return streaming_plan(length, length, block_size, True, 1, window, device)


def _broadcast_plan(partial: Tensor, full: Tensor, block_size: int) -> BlockSparsePlan:
    return BlockSparsePlan.from_block_tables(partial[None, None], block_size, full[None, None])


def random_plan(
    q_len: int,
    kv_len: int,
    block_size: int,
    density: float,
    heads: int,
    is_causal: bool = True,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    *,
    batch: int = 1,
    q_offset: int = 0,
) -> BlockSparsePlan:
    """A random plan ``[batch, heads, Mq, ...]`` keeping ``density`` of the visible blocks (the same count in
    every query-block row, so rows are balanced), always with the sink column and the diagonal block.
    For tests and benchmarks: density is counted over the visible (causal) blocks."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must lie in (0, 1], got {density}")
    visible, full = causal_block_tables(q_len, kv_len, block_size, is_causal, device, q_offset=q_offset)
    per_row = (visible.sum(-1) * density).round().clamp(min=1)
    return _random_rows(visible, full, per_row, q_len, kv_len, block_size, (batch, heads), q_offset, generator)


def fixed_count_plan(q_len: int, kv_len: int, block_size: int, blocks_per_row: int, heads: int, is_causal: bool = True,
                     device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> BlockSparsePlan:
    """A random plan ``[1, heads, Mq, ...]`` whose every query-block row keeps ``blocks_per_row`` blocks (all
    its visible ones when it has fewer; always the sink column and the diagonal block): the work items (query
    tile x head) stay the same while the key tiles grow with ``blocks_per_row``, which separates a kernel's cost
    per work item from its cost per key tile. For benchmarks and tests."""
    if blocks_per_row < 1:
        raise ValueError(f"blocks_per_row must be at least 1, got {blocks_per_row}")
    visible, full = causal_block_tables(q_len, kv_len, block_size, is_causal, device)
    per_row = torch.full((visible.shape[0],), blocks_per_row, device=device)
    return _random_rows(visible, full, per_row, q_len, kv_len, block_size, (1, heads), 0, generator)


def _random_rows(visible: Tensor, full: Tensor, per_row: Tensor, q_len: int, kv_len: int, block_size: int,
                 batch_heads: tuple[int, int], q_offset: int, generator: torch.Generator | None) -> BlockSparsePlan:
    """Each query-block row keeps ``per_row`` ``[Mq]`` random visible blocks of the ``visible`` table, at least
    the sink column and the diagonal block, per batch x head."""
    mq, nk = visible.shape
    device = visible.device
    q_last = (torch.arange(mq, device=device) * block_size + block_size).clamp(max=q_len) - 1 + q_offset
    diagonal = torch.arange(nk, device=device)[None, :] == (q_last.clamp(max=kv_len - 1) // block_size)[:, None]
    forced = visible & ((torch.arange(nk, device=device) == 0)[None, :] | diagonal)
    scores = torch.rand((*batch_heads, mq, nk), device=device, generator=generator)
    scores = torch.where(forced, 2.0, torch.where(visible, scores, -1.0))
    per_row = torch.maximum(per_row, forced.sum(-1)).to(torch.int64)
    rank = scores.argsort(-1, descending=True).argsort(-1)
    kept = (rank < per_row[:, None]) & visible
    return BlockSparsePlan.from_block_tables(kept & ~full, block_size, kept & full)
