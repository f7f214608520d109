"""Token-exact DAM patterns as per-head bitmaps, the form both the reference and the Triton kernel read.

A plan's ``token_diagonals`` / ``token_columns`` are sorted lists (see :class:`BlockSparsePlan`). For a given
run they become two int8 tables: ``diag_bits[h, (i + q_offset - j) + kv_len - 1]`` and ``col_bits[h, j]``, so
the per-token test inside a partial block is two gathers instead of a search through the lists.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .block_plan import PATTERN_PAD


def diagonal_table_length(q_len: int, kv_len: int, q_offset: int) -> int:
    """Entries of ``diag_bits``: every offset ``i + q_offset - j`` a query row and a key can have."""
    return max(1, q_len + q_offset + kv_len - 1)


def pattern_bitmaps(
    diagonals: Tensor, columns: Tensor, q_len: int, kv_len: int, q_offset: int = 0
) -> tuple[Tensor, Tensor]:
    """``(diag_bits [Hp, Ld], col_bits [Hp, kv_len])`` int8 from padded sorted lists ``[Hp, R]`` / ``[Hp, C]``.
    Offsets and columns that no query/key pair of this run can reach are dropped."""
    length = diagonal_table_length(q_len, kv_len, q_offset)
    return _scatter_bits(diagonals, kv_len - 1, length), _scatter_bits(columns, 0, kv_len)


def _scatter_bits(entries: Tensor, shift: int, length: int) -> Tensor:
    index = entries.to(torch.int64) + shift
    usable = (entries != PATTERN_PAD) & (index >= 0) & (index < length)
    # Unusable entries land in a spare last column that is dropped.
    index = torch.where(usable, index, length)
    bits = torch.zeros((entries.shape[0], length + 1), dtype=torch.int8, device=entries.device)
    return bits.scatter(1, index, 1)[:, :length]
