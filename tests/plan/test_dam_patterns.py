"""DAM's Stage 1 math (Box-Cox, true mask, pattern matching, extension) and the calibrated plan built from it."""

import itertools

import pytest
import torch

from dam_compile.plan.block_plan import PATTERN_PAD
from dam_compile.plan.reference import token_mask
from dam_compile.plan.dam_patterns import (
    HeadPatterns,
    box_cox,
    extended_mask,
    match_patterns,
    shifted_box_cox,
    true_mask,
)
from dam_compile.plan.pattern_plan import cached_pattern_plan, pattern_plan


def listed(row: torch.Tensor) -> list[int]:
    return [int(x) for x in row if x != PATTERN_PAD]


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


def random_patterns(heads, pcl, causal, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(heads, pcl, pcl, generator=g) ** 4
    return match_patterns(true_mask(a.tril() if causal else a, 0.5, 0.3), 0.5, causal)


@pytest.mark.parametrize("causal", [True, False])
def test_extension_equals_the_union_definition(causal):
    p = random_patterns(2, 6, causal, seed=3)
    for h in range(2):
        assert torch.equal(extended_mask(p, 23, 23, causal)[h], by_definition(p, h, 23, 23, causal))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("q_len, kv_len, pcl", [(50, 50, 8), (64, 64, 16), (37, 53, 8), (70, 70, 24), (40, 40, 40)])
def test_calibrated_plan_is_the_extended_mask(causal, q_len, kv_len, pcl):
    """Token-exact: the plan's token mask (partial blocks with the pattern, full blocks whole) is the extended
    DAM mask; blocks listed full are covered entirely."""
    p = random_patterns(3, pcl, causal, seed=q_len + pcl)
    plan = pattern_plan(p.diagonals, p.columns, p.corner, q_len, kv_len, 16, causal)
    plan.validate(batch=1, heads=3, q_len=q_len, kv_len=kv_len)
    expected = extended_mask(p, q_len, kv_len, causal)
    assert torch.equal(token_mask(plan, q_len, kv_len, causal)[0], expected)
    _, full = plan.block_tables(kv_len)
    for h, m, n in full[0].nonzero().tolist():
        assert expected[h, m * 16:(m + 1) * 16, n * 16:(n + 1) * 16].all()


def test_cached_plan_serves_its_length_bucket_exactly():
    p = random_patterns(2, 8, True, seed=0)
    for length in (33, 40, 48):  # one bucket of 16-blocks: 3 blocks
        plan = cached_pattern_plan(p.diagonals, p.columns, p.corner, length, length, 16, True)
        assert torch.equal(token_mask(plan, length, length, True)[0], extended_mask(p, length, length, True))
    first = cached_pattern_plan(p.diagonals, p.columns, p.corner, 33, 33, 16, True)
    assert cached_pattern_plan(p.diagonals, p.columns, p.corner, 48, 48, 16, True) is first
