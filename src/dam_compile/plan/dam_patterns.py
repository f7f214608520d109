"""DAM's pattern math (Zhang et al., ACL Findings 2025, arXiv 2506.11104, Stage 1), on plain tensors.

From a mean attention map ``A_bar`` at the pattern capture length PCL, per head:

1. Box-Cox amplification on ``X = max(A_bar, 1e-10)``: ``B = (X**lam - 1) / lam`` (``ln X`` when ``lam == 0``),
   shifted so that its minimum is 0;
2. the true mask ``M = B >= tau``;
3. pattern matching: diagonal ``r`` (key ``j = i - r``) and vertical ``c`` (key ``j = c``, rows that may see
   it) are kept when at least ``mu`` of their cells lie in ``M``;
4. extension to any length: inside the PCL x PCL corner the true mask itself, elsewhere the union of the kept
   diagonals (relative offsets) and verticals (absolute columns). A head that keeps no pattern keeps the
   diagonal ``r = 0``.

These functions are the definition the calibrated plans, the tests and the plots share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .block_plan import PATTERN_PAD

EPS = 1e-10  # DAM's floor on attention probabilities before the Box-Cox transform


def box_cox(x: Tensor, lam: float) -> Tensor:
    """Box-Cox transform of ``max(x, 1e-10)``: ``(x**lam - 1) / lam``, or ``ln x`` for ``lam == 0``."""
    x = x.clamp_min(EPS)
    if lam == 0:
        return torch.log(x)
    return (x.pow(lam) - 1.0) / lam


def shifted_box_cox(attention: Tensor, lam: float, dtype: torch.dtype = torch.float64,
                    all_min: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Box-Cox of ``attention [..., L, L]`` shifted per map so its minimum is 0 (when the minimum is
    negative; a non-negative map is left as it is), computed in ``dtype``. ``all_min``: the minimum over the
    maps' parts held elsewhere, when ``attention`` is one part of each map (the rows of a context-parallel rank)."""
    amplified = box_cox(attention.to(dtype), lam)
    low = amplified.amin(dim=(-2, -1), keepdim=True)
    low = low if all_min is None else all_min(low)
    return amplified - low.clamp(max=0.0)


def true_mask(attention: Tensor, lam: float, tau: float) -> Tensor:
    """DAM's true mask: bool ``[..., L, L]``, ``shifted_box_cox(attention) >= tau``."""
    return shifted_box_cox(attention, lam) >= tau


def pattern_offsets(pcl: int, is_causal: bool) -> Tensor:
    """The diagonal pool: offsets ``r = i - j`` of a PCL x PCL map (``0..PCL-1``; negative too when not causal)."""
    low = 0 if is_causal else -(pcl - 1)
    return torch.arange(low, pcl)


def diagonal_scores(mask: Tensor, is_causal: bool) -> Tensor:
    """gamma of every diagonal in :func:`pattern_offsets` order: the fraction of its cells inside ``mask``.
    ``mask``: bool ``[H, P, P]`` -> float64 ``[H, R]``."""
    pcl = mask.shape[-1]
    return torch.stack(
        [mask.diagonal(offset=-int(r), dim1=-2, dim2=-1).to(torch.float64).mean(-1)
         for r in pattern_offsets(pcl, is_causal)],
        dim=-1,
    )


def column_scores(mask: Tensor, is_causal: bool) -> Tensor:
    """gamma of every vertical ``c``: the fraction of its cells (rows ``i >= c`` when causal, all rows
    otherwise) inside ``mask``. ``mask``: bool ``[H, P, P]`` -> float64 ``[H, P]``."""
    pcl = mask.shape[-1]
    hits = mask.to(torch.float64).sum(-2)
    if not is_causal:
        return hits / pcl
    lower = torch.ones(pcl, pcl, dtype=torch.bool, device=mask.device).tril()
    hits = (mask & lower).to(torch.float64).sum(-2)
    return hits / torch.arange(pcl, 0, -1, device=mask.device, dtype=torch.float64)


@dataclass(frozen=True)
class HeadPatterns:
    """One attention module's DAM patterns, per query head.

    ``diagonals`` int32 ``[H, R]`` / ``columns`` int32 ``[H, C]``: kept offsets and columns, sorted, padded with
    :data:`PATTERN_PAD` (the plan's token-pattern format); ``corner`` bool ``[H, P, P]``: the true mask.
    """

    diagonals: Tensor
    columns: Tensor
    corner: Tensor

    @property
    def pcl(self) -> int:
        return self.corner.shape[-1]

    def to(self, device: torch.device | str) -> "HeadPatterns":
        return HeadPatterns(self.diagonals.to(device), self.columns.to(device), self.corner.to(device))


def match_patterns(mask: Tensor, mu: float, is_causal: bool = True) -> HeadPatterns:
    """Keep every diagonal and vertical of the pool with gamma >= ``mu``. ``mask``: bool ``[H, P, P]``.
    A head that keeps nothing gets the diagonal ``r = 0`` (a query always sees itself)."""
    offsets = pattern_offsets(mask.shape[-1], is_causal).to(mask.device)
    diag_keep = diagonal_scores(mask, is_causal) >= mu
    col_keep = column_scores(mask, is_causal) >= mu
    empty = ~(diag_keep.any(-1) | col_keep.any(-1))
    diag_keep = diag_keep | (empty[:, None] & (offsets == 0)[None, :])
    columns = torch.arange(mask.shape[-1], device=mask.device)
    return HeadPatterns(_padded_lists(diag_keep, offsets), _padded_lists(col_keep, columns), mask.clone())


def _padded_lists(keep: Tensor, values: Tensor) -> Tensor:
    """Per row, the kept ``values`` ascending, then :data:`PATTERN_PAD`: int32 ``[H, max kept]`` (width >= 1)."""
    width = max(1, int(keep.sum(-1).max().item()))
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[:, :width]
    picked = values[order]
    listed = torch.gather(keep, -1, order)
    return torch.where(listed, picked, PATTERN_PAD).to(torch.int32)


def extended_mask(patterns: HeadPatterns, q_len: int, kv_len: int, is_causal: bool, q_offset: int = 0) -> Tensor:
    """The extended DAM mask, bool ``[H, q_len, kv_len]``, straight from the definition: the true mask inside
    the PCL corner, the union of kept diagonals and columns elsewhere, and causal. Query row ``i`` sits at key
    position ``i + q_offset``. Materialises ``q_len * kv_len``: for tests and plots."""
    device = patterns.corner.device
    rows = torch.arange(q_len, device=device)[:, None] + q_offset
    cols = torch.arange(kv_len, device=device)[None, :]
    allowed = torch.stack([
        torch.isin(rows - cols, diagonals) | torch.isin(cols, columns)
        for diagonals, columns in zip(patterns.diagonals, patterns.columns)
    ])
    pcl = patterns.pcl
    in_corner = (rows < pcl) & (cols < pcl)
    corner = patterns.corner[:, rows.clamp(max=pcl - 1), cols.clamp(max=pcl - 1)]
    allowed = torch.where(in_corner[None], corner, allowed)
    if is_causal:
        allowed = allowed & (cols <= rows)[None]
    return allowed
