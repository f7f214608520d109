"""The shape matrix and checks that the dynamic plans' Triton kernels share (``dynamic/adaptive_plan_kernel.py``,
``dynamic/sampled_plan_kernel.py``): each against its PyTorch definition (``dynamic_block_plan``), the same lists
block for block, with the outputs poisoned before the kernels write them. Tests:
``dynamic/test_adaptive_plan_kernel.py``, ``dynamic/test_sampled_plan_kernel.py``."""

from __future__ import annotations

import functools
from unittest import mock

import pytest
import torch

from dam_compile.dynamic.dynamic_plan import dynamic_block_plan
from dam_compile.dynamic.estimators import ESTIMATOR_SPECS
from dam_compile.kernels.common import interpreting

FUSED_PLANS = {name: spec.fused_plan for name, spec in ESTIMATOR_SPECS.items() if spec.fused_plan is not None}
DEVICES = (["cpu"] if interpreting() else []) + (["cuda"] if torch.cuda.is_available() else [])
OPTIONS = dict(tau=0.3, box_cox_lambda=0.5, mu=0.8, density=0.2, mass_target=0.95, sink_blocks=1, local_blocks=2)
CASE_NAMES = "b, h, kvh, q_len, kv_len, d, block, causal, dtype, options, structured"


def inputs(b, h, kvh, q_len, kv_len, d, seed, structured, device, dtype):
    """Random Q/K; ``structured``: every 7th key leans toward the last queries (columns, retrieval-like heads
    where the pooled estimate disagrees with the exact mass)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, q_len, d, generator=g)
    k = torch.randn(b, kvh, kv_len, d, generator=g)
    if structured:
        k[..., ::7, :] += 2 * q[:, ::h // kvh, -1:, :]
        q = 2 * q
    return q.to(device=device, dtype=dtype), k.to(device=device, dtype=dtype)


def poisoned_empty(*args, **kwargs):
    """``torch.empty`` filled with a value no plan holds, so a slot the kernels skip cannot pass for written."""
    out = torch.ones(*args, **kwargs)
    return out.fill_(-7 if not out.is_floating_point() else float("nan"))


EVERY = tuple(sorted(FUSED_PLANS))
# The estimators each case runs: the need and list kernels are shared, so the default's own estimate kernel takes
# the cases that reach its branches (ragged, budgets cut, not causal, bf16, its defaults, one block).
CASES = [
    (EVERY, (1, 4, 2, 256, 256, 16, 16, True, torch.float32, {}, False)),
    (EVERY, (1, 4, 2, 250, 250, 16, 16, True, torch.float32, {}, True)),  # ragged: two exact query blocks
    (EVERY, (2, 4, 1, 300, 300, 16, 16, True, torch.float32, dict(density=0.05), False)),  # batch, MQA, cut
    (("adaptive",), (2, 4, 1, 300, 300, 16, 16, True, torch.float32, dict(density=0.05), True)),
    (("adaptive",), (1, 2, 2, 256, 256, 16, 16, False, torch.float32, {}, True)),
    (EVERY, (1, 2, 2, 200, 330, 16, 16, False, torch.float32, {}, False)),  # cross lengths, not causal
    (EVERY, (1, 4, 2, 512, 512, 32, 32, True, torch.bfloat16, {}, True)),
    (("adaptive",), (1, 4, 2, 512, 512, 16, 16, True, torch.float32, dict(box_cox_lambda=0.0), False)),
    (("adaptive",), (1, 4, 2, 512, 512, 16, 16, True, torch.float32, dict(box_cox_lambda=0.25, mass_target=0.5),
                     True)),
    (EVERY, (1, 3, 1, 384, 384, 16, 16, True, torch.float32, dict(density=1.0, mass_target=0.99), True)),  # defaults
    (("adaptive",), (1, 4, 4, 20, 20, 16, 16, True, torch.float32, {}, False)),  # two blocks, the first exact too
    (EVERY, (1, 2, 1, 10, 10, 16, 16, True, torch.float32, {}, True)),  # one block: no invisible block in the map
]


def cases(estimator: str) -> list:
    """The matrix's cases for ``estimator`` as ``pytest.param``s of :data:`CASE_NAMES`: batch 2 at 300 tokens
    takes ~10 s a case under the interpreter, so those run with the slow tests."""
    return [pytest.param(*case, marks=[pytest.mark.slow] if case[0] > 1 else [])
            for estimators, case in CASES if estimator in estimators]


def assert_kernels_equal_the_definition(estimator, device, b, h, kvh, q_len, kv_len, d, block, causal, dtype,
                                        options, structured):
    q, k = inputs(b, h, kvh, q_len, kv_len, d, q_len * 7 + kv_len, structured, device, dtype)
    kwargs = dict(OPTIONS, **options, block_size=block, is_causal=causal, scale=None)
    want = dynamic_block_plan(q, k, estimator=estimator, **kwargs)
    with mock.patch.object(torch, "empty", poisoned_empty):
        got = FUSED_PLANS[estimator](q, k, **kwargs)
    for name, w, o in zip(("partial counts", "partial lists", "full counts", "full lists"), want, got):
        assert o.shape == w.shape and o.dtype == w.dtype and o.is_contiguous(), name
        assert torch.equal(o, w), f"{name}: {(o != w).sum().item()} of {w.numel()} differ"


def assert_op_plan_on_cuda_is_the_definition_and_graph_capturable(estimator, length):
    """Through ``dam::dynamic_plan`` on the GPU (bf16, GQA): the definition's lists; and the launches capture
    into a CUDA graph (no host sync), whose replay on new inputs gives their plan."""
    from dam_compile.ops.attention import dynamic_plan_op

    q, k = inputs(1, 8, 2, length, length, 128, 3, True, "cuda", torch.bfloat16)
    call = functools.partial(dynamic_plan_op, block_size=128, is_causal=True, min_seq_len=0, kernel="auto",
                             scale=None, tau=0.3, box_cox_lambda=0.5, mu=0.8, density=0.075, mass_target=0.95,
                             sink_blocks=1, local_blocks=2, estimator=estimator)
    want = dynamic_block_plan(q, k, block_size=128, is_causal=True, density=0.075, mass_target=0.95,
                              estimator=estimator)
    assert all(torch.equal(o, w) for o, w in zip(call(q, k), want))
    static_q, static_k = q.clone(), k.clone()
    call(static_q, static_k)  # warm: kernels compiled before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call(static_q, static_k)
    q2, k2 = inputs(1, 8, 2, length, length, 128, 4, False, "cuda", torch.bfloat16)
    static_q.copy_(q2)
    static_k.copy_(k2)
    graph.replay()
    want = dynamic_block_plan(q2, k2, block_size=128, is_causal=True, density=0.075, mass_target=0.95,
                              estimator=estimator)
    assert all(torch.equal(o, w) for o, w in zip(captured, want))
