"""The adaptive dynamic plan's Triton kernels (``adaptive_block_plan``; its exact-row, need and list kernels also
serve the sampled plan) against their PyTorch definition (``dynamic_block_plan``): the same lists, block for
block, over the shape matrix of ``fused_plan_cases.py``, with the outputs poisoned before the kernels write them;
and where the op takes them (``fused_plan_runs``)."""

import pytest
import torch

from dam_compile.dynamic import block_estimates as be
from dam_compile.dynamic.adaptive_plan_kernel import fused_plan_runs
from dam_compile.dynamic.dynamic_plan import dynamic_block_plan

from fused_plan_cases import (
    CASE_NAMES,
    DEVICES,
    OPTIONS,
    assert_kernels_equal_the_definition,
    assert_op_plan_on_cuda_is_the_definition_and_graph_capturable,
    cases,
    inputs,
)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(CASE_NAMES, cases("adaptive"))
def test_kernels_equal_the_definition(device, b, h, kvh, q_len, kv_len, d, block, causal, dtype, options,
                                      structured):
    assert_kernels_equal_the_definition("adaptive", device, b, h, kvh, q_len, kv_len, d, block, causal, dtype,
                                        options, structured)


def test_matrix_reaches_every_branch():
    """The matrix's inputs take both sides of each choice the kernels make: pooled and vertical-slash heads,
    a density cap that cuts the budget, and one that does not."""
    choices = set()
    for structured in (False, True):
        q, k = inputs(1, 4, 2, 512, 512, 16, 512 * 8, structured, "cpu", torch.float32)
        column = be.last_rows_mass(q, k, 16, True, 0.25).mean(-2)
        pooled = be.pooled_estimate(q, k, 16, True, 0.25)
        choices |= set((be.js_divergence(pooled[..., -1, :], column).sqrt() < be.QUERY_AWARE_JS_DISTANCE)
                       .flatten().tolist())
    assert choices == {True, False}
    kept = {}
    for density in (0.05, 1.0):
        q, k = inputs(2, 4, 1, 300, 300, 16, 300 * 8, False, "cpu", torch.float32)
        plan = dynamic_block_plan(q, k, estimator="adaptive", **dict(OPTIONS, density=density), block_size=16,
                                  is_causal=True)
        kept[density] = (plan[0] + plan[2]).sum().item()
    assert kept[0.05] < kept[1.0]


def test_the_op_takes_the_kernels_on_cuda_only():
    q = torch.zeros(1, 2, 256, 16)
    assert not fused_plan_runs(q, 16)  # CPU plans stay on the definition (the CPU has no fast path to feed)
    if torch.cuda.is_available():
        assert fused_plan_runs(q.cuda().half(), 128)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("length", [4096, 32768 + 100])  # 32 key blocks; 257 (a ragged one, 8-row tiles)
def test_op_plan_on_cuda_is_the_definition_and_graph_capturable(length):
    assert_op_plan_on_cuda_is_the_definition_and_graph_capturable("adaptive", length)
