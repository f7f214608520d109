"""The plan format (``BlockSparsePlan``): tables to lists and back, and the errors of a plan that breaks the
format's rules or does not fit its inputs."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dam_compile.plan.block_plan import BlockSparsePlan, PlanError


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
