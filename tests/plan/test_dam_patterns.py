"""DAM's Stage 1 math (Box-Cox, true mask, pattern matching, extension); the calibrated plan built from it is
``test_pattern_plan.py``'s."""

import itertools

import pytest
import torch

from dam_compile.plan.dam_patterns import (
    HeadPatterns,
    box_cox,
    extended_mask,
    match_patterns,
    shifted_box_cox,
    true_mask,
)

from pattern_inputs import listed, random_patterns


def test_hand_computed_six_by_six():
    """A 6x6 causal map with a strong main diagonal and first column. Box-Cox (lambda 0.5) shifted: 0.5 -> 1.414,
    0.001 -> 0.063, so tau 0.3 keeps exactly the diagonal and column 0. At mu 0.8 the diagonal r=0 and
    column c=0 match (6/6), r=1 and c=1 do not (1/5); the one-cell patterns r=5 (cell (5,0), on column 0) and
    c=5 (cell (5,5), on the diagonal) match too, as DAM's gamma definition makes them."""
    a = torch.full((6, 6), 0.001).tril()
    a.fill_diagonal_(0.5)
    a[:, 0] = 0.5
    amplified = shifted_box_cox(a[None], 0.5)[0]
    assert amplified[0, 0].item() == pytest.approx(2 * (0.5 ** 0.5 - 1e-5), rel=1e-6)
    assert amplified[3, 1].item() == pytest.approx(2 * (0.001 ** 0.5 - 1e-5), rel=1e-6)
    assert amplified[1, 3].item() == pytest.approx(0.0, abs=1e-12)  # the zero upper triangle is the minimum
    mask = true_mask(a[None], 0.5, 0.3)[0]
    expected = torch.eye(6, dtype=torch.bool)
    expected[:, 0] = True
    assert torch.equal(mask, expected)
    patterns = match_patterns(mask[None], 0.8)
    assert listed(patterns.diagonals[0]) == [0, 5]
    assert listed(patterns.columns[0]) == [0, 5]
    assert torch.equal(patterns.corner[0], mask)


def test_box_cox_lambda_zero_is_log_and_floor():
    x = torch.tensor([0.0, 1e-12, 0.25, 1.0])
    assert torch.allclose(box_cox(x, 0.0), torch.log(torch.tensor([1e-10, 1e-10, 0.25, 1.0])))
    assert torch.allclose(box_cox(x, 0.5), (torch.tensor([1e-10, 1e-10, 0.25, 1.0]).sqrt() - 1) / 0.5)


def test_head_without_pattern_keeps_the_diagonal():
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    patterns = match_patterns(mask, 0.8)
    assert listed(patterns.diagonals[0]) == [0] and listed(patterns.columns[0]) == []


def by_definition(p: HeadPatterns, h: int, q_len: int, kv_len: int, causal: bool) -> torch.Tensor:
    """The extension written as DAM states it, one pair at a time."""
    diagonals, columns, pcl = set(listed(p.diagonals[h])), set(listed(p.columns[h])), p.pcl
    out = torch.zeros(q_len, kv_len, dtype=torch.bool)
    for i, j in itertools.product(range(q_len), range(kv_len)):
        if causal and j > i:
            continue
        out[i, j] = bool(p.corner[h, i, j]) if i < pcl and j < pcl else (i - j in diagonals or j in columns)
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_extension_equals_the_union_definition(causal):
    p = random_patterns(2, 6, causal, seed=3)
    for h in range(2):
        assert torch.equal(extended_mask(p, 23, 23, causal)[h], by_definition(p, h, 23, 23, causal))
