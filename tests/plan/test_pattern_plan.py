"""The calibrated plan (``pattern_plan``): DAM's extended mask as block lists with the token pattern attached, exact
for any length, offset and ragged last block, and its cache per length bucket."""

import pytest
import torch

from dam_compile.plan import pattern_plan as pattern_plan_module
from dam_compile.plan.block_plan import PATTERN_PAD
from dam_compile.plan.dam_patterns import extended_mask
from dam_compile.plan.pattern_plan import cached_pattern_plan, clear_pattern_plan_cache, pattern_plan
from dam_compile.plan.reference import token_mask

from pattern_inputs import listed, random_patterns


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


@pytest.mark.parametrize("q_len, kv_len", [(20, 70), (33, 33), (1, 90)])
def test_queries_aligned_to_the_end_of_the_keys(q_len, kv_len):
    """Row ``i`` at key position ``i + q_offset`` (a suffix of queries, as with a KV cache): the plan's token mask
    is the extended mask of the shifted rows, the corner included while a row is inside it."""
    p = random_patterns(2, 24, True, seed=q_len)
    offset = kv_len - q_len
    plan = pattern_plan(p.diagonals, p.columns, p.corner, q_len, kv_len, 16, True, q_offset=offset)
    plan.validate(batch=1, heads=2, q_len=q_len, kv_len=kv_len)
    expected = extended_mask(p, q_len, kv_len, True, q_offset=offset)
    assert torch.equal(token_mask(plan, q_len, kv_len, True, q_offset=offset)[0], expected)
    assert expected.any() and not expected.all()


@pytest.mark.parametrize("causal", [True, False])
def test_patterns_without_a_corner_are_the_union_of_diagonals_and_columns(causal):
    p = random_patterns(2, 8, causal, seed=5)
    q_len, kv_len = 37, 53
    plan = pattern_plan(p.diagonals, p.columns, None, q_len, kv_len, 16, causal)
    expected = torch.zeros(2, q_len, kv_len, dtype=torch.bool)
    for h in range(2):
        diagonals, columns = set(listed(p.diagonals[h])), set(listed(p.columns[h]))
        for i in range(q_len):
            for j in range(kv_len):
                expected[h, i, j] = (i - j in diagonals or j in columns) and (j <= i or not causal)
    assert plan.token_corner is None
    assert torch.equal(token_mask(plan, q_len, kv_len, causal)[0], expected)


def test_cache_rebuilds_edited_or_other_view_patterns_and_forgets_the_oldest(monkeypatch):
    """Keyed by the pattern tensors' storage, version and layout, per length bucket: a pattern edited in place and
    another view of the same storage get their own plans; the oldest entry goes first; ``clear`` forgets all."""
    clear_pattern_plan_cache()
    monkeypatch.setattr(pattern_plan_module, "CACHE_SIZE", 3)
    # Two heads keeping their main diagonal only (and a diagonal corner): one block per query block.
    diagonals = torch.tensor([[0, PATTERN_PAD], [0, 3]], dtype=torch.int32)
    columns = torch.full((2, 1), PATTERN_PAD, dtype=torch.int32)
    corner = torch.eye(8, dtype=torch.bool).expand(2, 8, 8).clone()

    def cached(length, heads=slice(None)):
        return cached_pattern_plan(diagonals[heads], columns[heads], corner[heads], length, length, 16, True)

    def fresh(length, heads=slice(None)):
        return token_mask(pattern_plan(diagonals[heads], columns[heads], corner[heads], length, length, 16, True),
                          length, length, True)

    first = cached(64)
    assert cached(64) is first
    eighty = cached(80)
    assert eighty is not first  # another bucket, another plan
    columns[0, 0] = 5  # edited in place (head 0 keeps key 5: block 0 for every row): a new version, rebuilt
    edited = cached(64)
    assert edited is not first and torch.equal(token_mask(edited, 64, 64, True), fresh(64))
    assert first.kept_blocks()[0, 0].tolist() == [1, 1, 1, 1] and edited.kept_blocks()[0, 0].tolist() == [1, 2, 2, 2]
    head = cached(64, slice(1, 2))  # a view of head 1 shares the storage: its own entry
    assert torch.equal(token_mask(head, 64, 64, True), fresh(64, slice(1, 2)))

    def entries():
        return [id(plan) for plan in pattern_plan_module._CACHE.values()]

    assert entries() == [id(eighty), id(edited), id(head)]  # the fourth entry pushed the first out
    assert cached(64) is edited  # a hit makes it the most recent ...
    ninety_six = cached(96)  # ... and the next new entry pushes out the oldest (the stale 80-token plan)
    assert entries() == [id(head), id(edited), id(ninety_six)]
    clear_pattern_plan_cache()
    assert not pattern_plan_module._CACHE
