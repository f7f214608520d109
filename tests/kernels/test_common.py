"""What the kernel launchers share (``kernels/common``): the integer helpers, the dot constexprs per dtype, the
TMA alignment test and the plan's list operands as the kernels read them."""

import pytest
import torch
import triton

from dam_compile.kernels import common
from dam_compile.kernels.common import CallShape, dot_options, next_power_of_2, plan_lists, tma_aligned
from dam_compile.plan import arith
from dam_compile.plan.block_plan import BlockSparsePlan


def test_next_power_of_2_is_tritons():
    for n in range(1, 5000):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
    assert next_power_of_2(0) == 1  # a tile of one at the least (Triton's gives 0)


def test_cdiv_and_scale_are_the_plan_layers():
    assert common.cdiv is arith.cdiv and common.softmax_scale is arith.softmax_scale


@pytest.mark.parametrize("interpreting", [False, True])
def test_dot_options_per_dtype(monkeypatch, interpreting):
    """float32 dots are exact (``ieee``), half types take tf32-class dots on a GPU; under the interpreter, whose
    ``tl.dot`` mishandles bfloat16, bfloat16 is upcast and then exact."""
    monkeypatch.setattr(common, "_INTERPRETING", interpreting)
    assert common.interpreting() is interpreting
    assert dot_options(torch.float32) == dict(DOT_PRECISION="ieee", UPCAST=False)
    assert dot_options(torch.float16) == dict(DOT_PRECISION="tf32", UPCAST=False)
    expected = dict(DOT_PRECISION="ieee", UPCAST=True) if interpreting else dict(DOT_PRECISION="tf32", UPCAST=False)
    assert dot_options(torch.bfloat16) == expected


def test_tma_aligned():
    base = torch.zeros(4, 8, 64, dtype=torch.bfloat16)
    assert tma_aligned(base)
    assert not tma_aligned(base.transpose(1, 2))  # the last dim strided
    assert not tma_aligned(base.flatten()[1:].view(1, -1))  # base address off by 2 bytes
    assert tma_aligned(torch.zeros(4, 12, dtype=torch.float32)[:, :4])  # a column slice, rows 48 bytes apart
    assert not tma_aligned(torch.zeros(4, 6, dtype=torch.float32))  # rows 24 bytes apart


def test_plan_lists_expand_a_broadcast_plan_without_copies():
    """The list operands of a ``[1, 1, Mq]`` plan, for a call of batch 2 and 3 heads: views of the plan's tensors
    with stride 0 on the broadcast dims; without full blocks the full operand is the partial one."""
    shape = CallShape(batch=2, heads=3, q_len=40, head_dim=16, kv_heads=1, kv_len=40)
    table = torch.tensor([[True, False, False], [True, True, False], [False, True, True]])[None, None]
    plan = BlockSparsePlan.from_block_tables(table, 16)
    partial, full = plan_lists(plan, shape)
    counts, count_strides, indices, index_strides = partial
    assert counts.shape == (2, 3, 3) and indices.shape == (2, 3, 3, 3)
    assert count_strides == (0, 0, 1) and index_strides == (0, 0, 3)
    assert counts.data_ptr() == plan.kv_num_blocks.data_ptr() and indices.data_ptr() == plan.kv_indices.data_ptr()
    assert torch.equal(counts[1, 2], plan.kv_num_blocks[0, 0]) and torch.equal(indices[1, 2], plan.kv_indices[0, 0])
    assert full is partial


def test_plan_lists_keep_per_head_full_lists_apart():
    shape = CallShape(batch=1, heads=2, q_len=32, head_dim=16, kv_heads=2, kv_len=32)
    g = torch.Generator().manual_seed(0)
    kept = torch.rand(1, 2, 2, 2, generator=g) < 0.7
    split = torch.rand(1, 2, 2, 2, generator=g) < 0.5
    plan = BlockSparsePlan.from_block_tables(kept & split, 16, kept & ~split)
    partial, full = plan_lists(plan, shape)
    assert torch.equal(partial[0], plan.kv_num_blocks) and torch.equal(full[0], plan.full_kv_num_blocks)
    assert full[2].data_ptr() == plan.full_kv_indices.data_ptr() and full[1] == plan.full_kv_num_blocks.stride()
    assert full[3] == plan.full_kv_indices.stride()[:3]
