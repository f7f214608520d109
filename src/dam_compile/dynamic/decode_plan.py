"""The kept key blocks of a decode step: one query row (the newest token) against the whole KV cache.

The row sits at the last key the mask lets it see (the last key when there is no mask; with a static cache or
left padding, the mask says where). Whole blocks are kept; inside them only the mask applies, so a decode step
attends to a superset of the prefill's token-exact pattern for the same row. By ``source``:

- ``dense``: every block up to the row (identical to full attention);
- ``streaming``: ``sink_blocks`` from the first valid key, ``local_blocks`` ending at the row;
- ``dynamic``: sink + local, plus the blocks of highest exact attention mass for this row's query (its scores
  against every key: K is read once, V only in the kept blocks): at least ``ceil(density * Nk)`` of them, and
  as many as hold ``EXACT_ROW_MASS`` of the row's mass, so a needle the prefill kept is never lost to a sampled
  estimate or a fixed budget (the prefill's last query block keeps the same share);
- ``calibrated``: the blocks holding the row's DAM keys: ``row - r`` for each diagonal ``r``, each column ``c``
  and, while the row is inside the pattern capture length, every key before it (the true-mask corner).

Plain PyTorch without host syncs or data-dependent shapes: it can run inside a captured CUDA graph.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .block_estimates import EXACT_ROW_MASS, blocks_each_row_needs
from .estimators import FIXED_DENSITY
from dam_compile.plan.arith import cdiv, softmax_scale
from dam_compile.plan.block_plan import PATTERN_PAD, num_blocks
from dam_compile.plan.defaults import DEFAULT_LOCAL_BLOCKS, DEFAULT_SINK_BLOCKS

DECODE_SOURCES = ("dense", "streaming", "dynamic", "calibrated")


def decode_block_plan(
    query: Tensor,
    key: Tensor,
    attn_mask: Tensor | None = None,
    diagonals: Tensor | None = None,
    columns: Tensor | None = None,
    *,
    source: str,
    block_size: int,
    sink_blocks: int = DEFAULT_SINK_BLOCKS,
    local_blocks: int = DEFAULT_LOCAL_BLOCKS,
    density: float = FIXED_DENSITY,
    scale: float | None = None,
    corner_len: int = 0,
    dynamic_heads: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Kept blocks of the row ``query [B, H, 1, E]`` against ``key [B, KVH, Lk, E]``.

    Args:
        attn_mask: bool or additive float, broadcastable to ``[B, H, 1, Lk]`` (``None``: every key visible).
        diagonals, columns: the calibrated source's per-head patterns ``[H, R]`` / ``[H, C]`` (int32, padded
            with ``PATTERN_PAD``); ``corner_len``: its pattern capture length.
        dynamic_heads: calibrated source only, bool ``[H]`` or ``None``: heads the profile marks dynamic
            (retrieval heads) keep the ``dynamic`` source's blocks instead of their patterns'.

    Returns:
        ``(kv_num_blocks [B, H, 1], kv_indices [B, H, 1, Nk])``, int32, kept blocks first in ascending order.
    """
    if source not in DECODE_SOURCES:
        raise ValueError(f"source must be one of {DECODE_SOURCES}, got {source!r}")
    batch, heads = query.shape[:2]
    kv_len = key.shape[-2]
    nk = num_blocks(kv_len, block_size)
    device = query.device
    first, row = _row_span(attn_mask, batch, kv_len, device)
    blocks = torch.arange(nk, device=device)
    first_block, row_block = (first // block_size)[:, None], (row // block_size)[:, None]
    visible = (blocks >= first_block) & (blocks <= row_block)  # [B, Nk]
    always = visible & ((blocks < first_block + sink_blocks) | (blocks > row_block - local_blocks))
    # The dynamic source's blocks (also a calibrated profile's dynamic heads').
    dynamic = lambda: always[:, None] | _top_blocks(  # noqa: E731
        query, key, first, row, visible, block_size, density, scale)
    if source == "dense":
        keep = visible[:, None].expand(batch, heads, nk)
    elif source == "streaming":
        keep = always[:, None].expand(batch, heads, nk)
    elif source == "dynamic":
        keep = dynamic()
    else:
        if diagonals is None or columns is None:
            raise ValueError("the calibrated decode plan needs diagonals and columns")
        keep = _pattern_blocks(diagonals, columns, row, nk, block_size, corner_len) & visible[:, None]
        if dynamic_heads is not None:
            keep = torch.where(dynamic_heads.to(torch.bool)[None, :, None], dynamic(), keep)
    counts = keep.sum(-1, dtype=torch.int32)
    indices = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts[..., None], indices[:, :, None, :]


def _row_span(attn_mask: Tensor | None, batch: int, kv_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """First and last key the row may see, int64 ``[B]`` each."""
    if attn_mask is None:
        zero = torch.zeros(batch, dtype=torch.int64, device=device)
        return zero, zero + (kv_len - 1)
    allowed = attn_mask if attn_mask.dtype == torch.bool else attn_mask > float("-inf")
    allowed = allowed[..., -1, :] if allowed.dim() >= 2 else allowed  # the (last) query row
    while allowed.dim() > 2:
        allowed = allowed.any(1)  # any head
    allowed = allowed.reshape(-1, kv_len).expand(batch, kv_len)
    positions = torch.arange(kv_len, device=device)
    first = torch.where(allowed, positions, kv_len).amin(-1).clamp(max=kv_len - 1)
    last = torch.where(allowed, positions, -1).amax(-1).clamp(min=0)
    return first, last


def _top_blocks(
    query: Tensor, key: Tensor, first: Tensor, row: Tensor, visible: Tensor, block_size: int, density: float,
    scale: float | None,
) -> Tensor:
    """``[B, H, Nk]``: the visible blocks of highest exact attention mass for this row, at least
    ``ceil(density * Nk)`` and as many as hold ``EXACT_ROW_MASS`` of its mass. A block's logit is the
    log-sum-exp of the row's scores against its keys in ``[first, row]``: reading all of K (V only for the kept
    blocks) is what lets a decode step find a needle that a few sampled keys miss."""
    batch, heads, _, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[-2]
    nk = visible.shape[-1]
    q = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(q, key.transpose(-1, -2)).to(torch.float32) * softmax_scale(scale, dim)
    positions = torch.arange(kv_len, device=query.device)
    outside = (positions < first[:, None]) | (positions > row[:, None])  # [B, Lk]
    scores = scores.masked_fill(outside[:, None, None], float("-inf"))
    scores = F.pad(scores, (0, nk * block_size - kv_len), value=float("-inf"))
    logits = torch.logsumexp(scores.unflatten(-1, (nk, block_size)), dim=-1).reshape(batch, heads, nk)
    logits = logits.masked_fill(~visible[:, None], float("-inf"))
    width = torch.sym_min(nk, cdiv(nk * math.ceil(density * 1000), 1000))  # ceil(density * nk), symbolic-safe
    top = logits.topk(width, dim=-1)
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, top.indices, top.values > float("-inf"))
    return keep | blocks_each_row_needs(torch.softmax(logits, dim=-1)[..., None, :], EXACT_ROW_MASS)


def _pattern_blocks(
    diagonals: Tensor, columns: Tensor, row: Tensor, nk: int, block_size: int, corner_len: int
) -> Tensor:
    """``[B, H, Nk]``: blocks holding key ``row - r`` (each diagonal ``r``), each column ``c <= row``, and
    every key before the row while the row is inside the pattern capture length."""
    row = row[:, None, None]
    diag_pos = row - diagonals[None].to(torch.int64)
    diag_ok = (diagonals[None] != PATTERN_PAD) & (diag_pos >= 0) & (diag_pos <= row)
    col_pos = columns[None].to(torch.int64).expand(row.shape[0], -1, -1)
    col_ok = (columns[None] != PATTERN_PAD) & (col_pos <= row) & (col_pos >= 0)
    positions = torch.cat([diag_pos.expand_as(diag_ok), col_pos], -1)
    ok = torch.cat([diag_ok, col_ok], -1)
    target = torch.where(ok, positions // block_size, nk)  # misses land in a spare column
    table = torch.zeros((*ok.shape[:-1], nk + 1), dtype=torch.bool, device=ok.device)
    table = table.scatter(-1, target, True)[..., :nk]
    in_corner = (row < corner_len) & (torch.arange(nk, device=ok.device) <= row // block_size)
    return table | in_corner
