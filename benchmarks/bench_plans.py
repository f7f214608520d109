"""Plans the benchmarks and tests build but the library never does: random plans (a density, or a fixed count
per row) and the StreamingLLM baseline matched to a density. Built on the library's ``structured_plans``."""

from __future__ import annotations

import torch
from torch import Tensor

from dam_compile.plan.block_plan import BlockSparsePlan
from dam_compile.plan.structured_plans import causal_block_tables, streaming_plan


def density_matched_streaming_plan(
    length: int, block_size: int, density: float, device: torch.device | str = "cpu"
) -> BlockSparsePlan:
    """The StreamingLLM baseline at about ``density`` of the causal-visible blocks of ``length`` tokens: one sink
    block plus a window sized to ``density`` of the average visible row (at least one block). Rows shorter than
    the window keep all they see, so at a high ``density`` the plan keeps somewhat less (0.26 for 0.29 at 8K)."""
    visible, _ = causal_block_tables(length, length, block_size, True, device)
    window = max(1, round(density * float(visible.sum(-1).float().mean())) - 1)
    return streaming_plan(length, length, block_size, True, 1, window, device)


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
    Density is counted over the visible (causal) blocks."""
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
    per work item from its cost per key tile."""
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
