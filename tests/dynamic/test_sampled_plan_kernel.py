"""The default dynamic plan's Triton kernels (``sampled_block_plan``, ``estimator="sampled"``) against their
PyTorch definition (``dynamic_block_plan``): the same lists, block for block, over the cases of
``fused_plan_cases.py`` that reach its own estimate kernel's branches, with the outputs poisoned before the
kernels write them. (The need and list kernels it shares: ``test_adaptive_plan_kernel.py``.)"""

import pytest
import torch

from fused_plan_cases import (
    CASE_NAMES,
    DEVICES,
    assert_kernels_equal_the_definition,
    assert_op_plan_on_cuda_is_the_definition_and_graph_capturable,
    cases,
)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(CASE_NAMES, cases("sampled"))
def test_kernels_equal_the_definition(device, b, h, kvh, q_len, kv_len, d, block, causal, dtype, options,
                                      structured):
    assert_kernels_equal_the_definition("sampled", device, b, h, kvh, q_len, kv_len, d, block, causal, dtype,
                                        options, structured)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("length", [4096, 32768 + 100])  # 32 key blocks; 257 (a ragged one, 8-row tiles)
def test_op_plan_on_cuda_is_the_definition_and_graph_capturable(length):
    assert_op_plan_on_cuda_is_the_definition_and_graph_capturable("sampled", length)
