"""Token patterns as per-head bitmaps (``token_pattern``): every query/key pair of a run finds its diagonal and
column bit where the lists say, unreachable and padded entries are dropped (never wrapped onto another bit)."""

import pytest
import torch

from dam_compile.plan.block_plan import PATTERN_PAD
from dam_compile.plan.token_pattern import diagonal_table_length, pattern_bitmaps

from pattern_inputs import listed


def padded(rows: list[list[int]], width: int) -> torch.Tensor:
    return torch.tensor([row + [PATTERN_PAD] * (width - len(row)) for row in rows], dtype=torch.int32)


def test_diagonal_table_length_covers_every_offset_of_a_run():
    assert diagonal_table_length(5, 7, 0) == 11  # offsets -6 .. 4
    assert diagonal_table_length(1, 100, 99) == 199  # a decode row at the end: offsets 0 .. 99 and the rest
    assert diagonal_table_length(0, 0, 0) == 1  # never empty


@pytest.mark.parametrize("q_len, kv_len, q_offset", [(9, 9, 0), (4, 13, 9), (12, 5, 0), (1, 30, 29)])
def test_bits_of_every_pair_are_the_lists(q_len, kv_len, q_offset):
    """Diagonals from far below to far above the run (negative: keys after the row, not causal), columns inside
    and past the keys, and padding: each pair's bits equal membership in the head's lists."""
    diagonals = padded([[-40, -3, 0, 2, 7, 60], [1], []], 6)
    columns = padded([[0, 4, 99], [], [3, 12]], 3)
    diag_bits, col_bits = pattern_bitmaps(diagonals, columns, q_len, kv_len, q_offset)
    length = diagonal_table_length(q_len, kv_len, q_offset)
    assert diag_bits.shape == (3, length) and col_bits.shape == (3, kv_len)
    assert diag_bits.dtype == col_bits.dtype == torch.int8
    for h in range(3):
        offsets, cols = set(listed(diagonals[h])), set(listed(columns[h]))
        for i in range(q_len):
            for j in range(kv_len):
                r = i + q_offset - j
                assert diag_bits[h, r + kv_len - 1] == (r in offsets), (h, i, j)
        assert col_bits[h].tolist() == [int(j in cols) for j in range(kv_len)]
        # No other bit is set: an unreachable offset or column leaves no trace.
        reachable = {r for r in offsets if 0 <= r + kv_len - 1 < length}
        assert int(diag_bits[h].sum()) == len(reachable)
    assert not diag_bits[2].any() and not col_bits[1].any()


def test_lists_without_entries_set_no_bit():
    diagonals = torch.full((2, 0), PATTERN_PAD, dtype=torch.int32)
    diag_bits, col_bits = pattern_bitmaps(diagonals, diagonals, 3, 4)
    assert diag_bits.shape == (2, 6) and col_bits.shape == (2, 4)
    assert not diag_bits.any() and not col_bits.any()
