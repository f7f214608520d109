import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dam_compile.plan.block_plan import BlockSparsePlan, PlanError
from dam_compile.plan.structured_plans import causal_block_tables, dense_plan, streaming_plan
from dam_compile.plan.reference import token_mask
from dam_compile.plan.reference import plan_density

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # bench_plans: the random plans
from bench_plans import fixed_count_plan  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 2), h=st.integers(1, 3), mq=st.integers(1, 5), nk=st.integers(1, 7), seed=st.integers(0, 2**16)
)
def test_block_table_round_trip(b, h, mq, nk, seed):
    g = torch.Generator().manual_seed(seed)
    table = torch.rand(b, h, mq, nk, generator=g) < 0.5
    plan = BlockSparsePlan.from_block_tables(table, 16)
    plan.validate(batch=b, heads=h, q_len=mq * 16, kv_len=nk * 16)
    partial, full = plan.block_tables(nk * 16)
    assert torch.equal(partial, table) and not full.any()
    assert plan.kv_num_blocks.dtype == torch.int32 and plan.kv_indices.dtype == torch.int32
    assert torch.equal(plan.kept_blocks(), table.sum(-1))


def _plan(counts, indices, full=None):
    c = torch.tensor(counts, dtype=torch.int32)
    i = torch.tensor(indices, dtype=torch.int32)
    if full is None:
        return BlockSparsePlan(c, i, 16)
    return BlockSparsePlan(c, i, 16, torch.tensor(full[0], dtype=torch.int32), torch.tensor(full[1], dtype=torch.int32))


@pytest.mark.parametrize(
    "plan_fn, message",
    [
        (lambda: BlockSparsePlan(torch.ones(1, 1, 2, dtype=torch.int64), torch.zeros(1, 1, 2, 2, dtype=torch.int32), 16), "kv_num_blocks must be int32"),
        (lambda: _plan([[1, 1]], [[[0, 1], [0, 1]]]), r"must be \[B, H, Mq\]"),
        (lambda: _plan([[[1, 1, 1]]], [[[[0], [0], [0]]]]), "expected .*2.*query blocks"),
        (lambda: _plan([[[1, 1]], [[1, 1]], [[1, 1]]], [[[[0], [0]]]] * 3), r"1 or 2"),
        (lambda: _plan([[[3, 1]]], [[[[0, 1], [0, 1]]]]), "kv_num_blocks must lie"),
        (lambda: _plan([[[1, 1]]], [[[[2, 0], [0, 0]]]]), "out of range"),
        (lambda: _plan([[[2, 1]]], [[[[1, 0], [0, 0]]]]), "strictly increasing"),
        (lambda: _plan([[[2, 1]]], [[[[0, 0], [0, 0]]]]), "strictly increasing"),
        (lambda: _plan([[[1, 1]]], [[[[0, 0], [1, 0]]]], ([[[1, 0]]], [[[[0, 0], [0, 0]]]])), "both"),
        (lambda: BlockSparsePlan(torch.zeros(1, 1, 2, dtype=torch.int32), torch.zeros(1, 1, 2, 2, dtype=torch.int32), 16, torch.zeros(1, 1, 2, dtype=torch.int32)), "together"),
        (lambda: BlockSparsePlan(torch.zeros(1, 1, 2, dtype=torch.int32), torch.zeros(1, 1, 2, 2, dtype=torch.int32), 0), "block_size"),
    ],
)
def test_invalid_plans_raise_clear_errors(plan_fn, message):
    with pytest.raises(PlanError, match=message):
        plan_fn().validate(batch=2, heads=1, q_len=32, kv_len=32)


def _token_visible(q_len, kv_len, is_causal):
    if not is_causal:
        return torch.ones(q_len, kv_len, dtype=torch.bool)
    return torch.arange(kv_len)[None, :] <= torch.arange(q_len)[:, None]


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
