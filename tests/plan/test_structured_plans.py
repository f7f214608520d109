"""The fixed plans, built from lengths alone (``structured_plans``): the causal block tables, every visible
block (dense), sink + local window (streaming), against their token definitions."""

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dam_compile.plan.reference import plan_density, token_mask
from dam_compile.plan.structured_plans import (
    block_token_ranges,
    causal_block_tables,
    dense_plan,
    streaming_plan,
    streaming_window,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # bench_plans: the random plans
from bench_plans import fixed_count_plan  # noqa: E402


def _token_visible(q_len, kv_len, is_causal, q_offset=0):
    """Query row ``i`` (at key position ``i + q_offset``) may see key ``j``: the definition, token by token."""
    if not is_causal:
        return torch.ones(q_len, kv_len, dtype=torch.bool)
    return torch.arange(kv_len)[None, :] <= torch.arange(q_len)[:, None] + q_offset


@settings(max_examples=60, deadline=None)
@given(q_len=st.integers(1, 70), kv_len=st.integers(1, 70), block=st.sampled_from([4, 8, 16]), is_causal=st.booleans())
def test_causal_block_tables_match_token_definition(q_len, kv_len, block, is_causal):
    visible, full = causal_block_tables(q_len, kv_len, block, is_causal)
    tokens = _token_visible(q_len, kv_len, is_causal)
    for m in range(visible.shape[0]):
        for n in range(visible.shape[1]):
            cell = tokens[m * block:(m + 1) * block, n * block:(n + 1) * block]
            assert visible[m, n] == cell.any()
            assert full[m, n] == cell.all()


@settings(max_examples=40, deadline=None)
@given(q_len=st.integers(1, 70), kv_len=st.integers(1, 70), block=st.sampled_from([4, 16]), is_causal=st.booleans())
def test_dense_plan_is_exactly_full_attention(q_len, kv_len, block, is_causal):
    plan = dense_plan(q_len, kv_len, block, is_causal)
    plan.validate(batch=1, heads=1, q_len=q_len, kv_len=kv_len)
    assert torch.equal(token_mask(plan, q_len, kv_len, is_causal)[0, 0], _token_visible(q_len, kv_len, is_causal))
    assert plan_density(plan, q_len, kv_len, is_causal) == 1.0


@pytest.mark.parametrize("is_causal", [True, False])
def test_streaming_plan_keeps_sink_and_local_window(is_causal):
    q_len = kv_len = 200
    plan = streaming_plan(q_len, kv_len, 16, is_causal, sink_blocks=2, local_blocks=3)
    plan.validate(batch=1, heads=1, q_len=q_len, kv_len=kv_len)
    partial, full = plan.block_tables(kv_len)
    kept = (partial | full)[0, 0]
    visible, _ = causal_block_tables(q_len, kv_len, 16, is_causal)
    assert not (kept & ~visible).any()
    total = 0
    for m in range(kept.shape[0]):
        expected = {n for n in range(kept.shape[1]) if visible[m, n] and (n < 2 or (m - 2 <= n <= m if is_causal else abs(n - m) < 3))}
        assert set(kept[m].nonzero().flatten().tolist()) == expected
        total += len(expected)
    assert plan_density(plan, q_len, kv_len, is_causal) == pytest.approx(total / visible.sum().item())
    assert total < visible.sum().item() * 0.75


@settings(max_examples=40, deadline=None)
@given(q_len=st.integers(1, 50), kv_len=st.integers(1, 90), block=st.sampled_from([4, 16]),
       q_offset=st.integers(0, 40))
def test_block_token_ranges_and_tables_follow_the_query_offset(q_len, kv_len, block, q_offset):
    """Row ``i`` sits at key position ``i + q_offset``: each block's first and last position (ragged last blocks
    clipped), and the causal tables of the shifted rows, as the token definition says."""
    q_first, q_last, k_first, k_last = block_token_ranges(q_len, kv_len, block, q_offset=q_offset)
    rows, keys = torch.arange(q_len) + q_offset, torch.arange(kv_len)
    assert q_first.tolist() == [int(r[0]) for r in rows.split(block)]
    assert q_last.tolist() == [int(r[-1]) for r in rows.split(block)]
    assert k_first.tolist() == [int(r[0]) for r in keys.split(block)]
    assert k_last.tolist() == [int(r[-1]) for r in keys.split(block)]
    visible, full = causal_block_tables(q_len, kv_len, block, True, q_offset=q_offset)
    tokens = _token_visible(q_len, kv_len, True, q_offset)
    for m, query_block in enumerate(tokens.split(block)):
        for n, cell in enumerate(query_block.split(block, dim=1)):
            assert visible[m, n] == cell.any() and full[m, n] == cell.all(), (m, n)
    plan = dense_plan(q_len, kv_len, block, True, q_offset=q_offset)
    assert torch.equal(token_mask(plan, q_len, kv_len, True, q_offset=q_offset)[0, 0], tokens)


@pytest.mark.parametrize("is_causal", [True, False])
def test_fixed_plans_list_blocks_seen_whole_as_full_and_broadcast(is_causal):
    """Partial blocks are exactly the kept ones that some query sees only in part (the kernel masks only those);
    the plans are one row list for every batch and head."""
    q_len, kv_len = 100, 130
    _, whole = causal_block_tables(q_len, kv_len, 16, is_causal)
    for plan in (dense_plan(q_len, kv_len, 16, is_causal), streaming_plan(q_len, kv_len, 16, is_causal, 1, 2)):
        assert plan.kv_num_blocks.shape[:2] == (1, 1) and plan.full_kv_num_blocks.shape[:2] == (1, 1)
        partial, full = plan.block_tables(kv_len)
        assert torch.equal(full[0, 0], (partial | full)[0, 0] & whole)
        assert not (partial[0, 0] & whole).any()
        assert full.any() and (partial.any() or not is_causal)


def test_streaming_window_by_hand():
    """Causal: the sink blocks and the ``local_blocks`` blocks ending at the diagonal; otherwise a window of
    ``local_blocks`` on each side of the diagonal (the diagonal counted once)."""
    m, n = torch.arange(6)[:, None], torch.arange(6)[None, :]
    causal = streaming_window(m, n, 1, 2, True)
    assert [row.nonzero().flatten().tolist() for row in causal] == [[0], [0, 1], [0, 1, 2], [0, 2, 3], [0, 3, 4],
                                                                     [0, 4, 5]]
    both_sides = streaming_window(m, n, 0, 2, False)
    assert both_sides[3].nonzero().flatten().tolist() == [2, 3, 4]
    assert not streaming_window(m, n, 0, 0, True).any()


# The benchmarks' fixed-count plan (benchmarks/bench_plans.py, built on the tables above): its tests stay with the
# fixed plans until the benchmarks' folder has a test file for bench_plans.


@pytest.mark.parametrize("blocks_per_row", [1, 3, 8])
def test_fixed_count_plan_keeps_that_many_visible_blocks_per_row_with_sink_and_diagonal(blocks_per_row):
    q_len = kv_len = 200
    plan = fixed_count_plan(q_len, kv_len, 16, blocks_per_row, 3, True, generator=torch.Generator().manual_seed(0))
    plan.validate(batch=1, heads=3, q_len=q_len, kv_len=kv_len)
    partial, full = plan.block_tables(kv_len)
    kept = partial | full
    visible, full_table = causal_block_tables(q_len, kv_len, 16, True)
    assert not (kept & ~visible).any() and not (full & ~full_table).any() and not (partial & full_table).any()
    rows = torch.arange(visible.shape[0])
    assert kept[..., 0].all() and kept[..., rows, rows].all()  # the sink column and the diagonal block
    expected = visible.sum(-1).clamp(max=blocks_per_row).clamp(min=torch.where(rows > 0, 2, 1))
    assert torch.equal(kept.sum(-1), expected.expand(1, 3, -1))
    if blocks_per_row == 8:  # the random blocks differ between heads
        assert not torch.equal(kept[0, 0], kept[0, 1])


def test_fixed_count_plan_rejects_a_count_below_one():
    with pytest.raises(ValueError, match="blocks_per_row"):
        fixed_count_plan(64, 64, 16, 0, 2)
