"""``torch.ops.dam.*``: opcheck, and the run-time choice between sparse and dense."""

import pytest
import torch
import torch.nn.functional as F

import dam_compile
from dam_compile.plan.block_plan import BlockSparsePlan
from dam_compile.plan.reference import block_sparse_attention_reference
from dam_compile.plan.structured_plans import dense_plan, streaming_plan
from dam_compile.ops.attention import sparse_attention

import kernel_inputs
from dam_testing import rel_err

BLOCK = 16


def qkv(b=1, h=4, kvh=2, q_len=48, kv_len=48, d=16, dtype=torch.float32):
    return torch.randn(b, h, q_len, d, dtype=dtype), torch.randn(b, kvh, kv_len, d, dtype=dtype), torch.randn(b, kvh, kv_len, d, dtype=dtype)


@pytest.mark.parametrize("with_mask", [False, True])
def test_opcheck_sparse_attention(with_mask):
    q, k, v = qkv()
    plan = streaming_plan(48, 48, BLOCK, not with_mask, 1, 1)
    mask = torch.rand(1, 1, 48, 48) < 0.7 if with_mask else None
    args = (q, k, v, *plan.as_op_args(), mask, 0.5, not with_mask, True, BLOCK, 0, "reference")
    torch.library.opcheck(torch.ops.dam.sparse_attention.default, args)


@pytest.mark.parametrize("op, extra", [("dense_plan", ()), ("streaming_plan", (1, 2))])
def test_opcheck_plan_ops(op, extra):
    q, k, _ = qkv(q_len=40, kv_len=56)
    torch.library.opcheck(getattr(torch.ops.dam, op).default, (q, k, BLOCK, True, 0, "reference", *extra))
    counts, indices, full_counts, full_indices = getattr(torch.ops.dam, op)(q, k, BLOCK, True, 0, "reference", *extra)
    plan = BlockSparsePlan(counts, indices, BLOCK, full_counts, full_indices)
    plan.validate(batch=1, heads=4, q_len=40, kv_len=56)
    assert plan.kept_blocks().min() >= 1


@pytest.mark.parametrize("min_seq_len, kernel", [(64, "reference"), (0, "auto")])
def test_plan_ops_skip_work_when_attention_will_be_dense(min_seq_len, kernel):
    """Short inputs and devices without a sparse kernel get a valid plan that keeps nothing: the op's dense
    path never reads it, so nothing is computed for it."""
    q, k, _ = qkv(q_len=40, kv_len=56)
    counts, indices, full_counts, full_indices = torch.ops.dam.dense_plan(q, k, BLOCK, True, min_seq_len, kernel)
    plan = BlockSparsePlan(counts, indices, BLOCK, full_counts, full_indices)
    plan.validate(batch=1, heads=4, q_len=40, kv_len=56)
    assert plan.kept_blocks().max() == 0


def run(q, k, v, plan, **kw):
    return sparse_attention(q, k, v, plan, is_causal=True, enable_gqa=True, **kw)


def test_reference_kernel_runs_the_plan():
    q, k, v = qkv()
    plan = streaming_plan(48, 48, BLOCK, True, 1, 1)
    out = run(q, k, v, plan, kernel="reference")
    assert torch.equal(out, block_sparse_attention_reference(q, k, v, plan, is_causal=True, enable_gqa=True))
    assert rel_err(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)) > 1e-2
    assert dam_compile.runtime_stats() == {"reference: kernel='reference'": 1}


@pytest.mark.parametrize(
    "q_len, kwargs, reason",
    [
        (48, {"kernel": "reference", "min_seq_len": 64}, "shorter than min_seq_len=64"),
        (1, {"kernel": "reference", "min_seq_len": 64}, "decode step: KV cache shorter than min_seq_len=64"),
        (48, {"kernel": "auto"}, "CPU tensors"),
    ],
)
def test_dense_at_run_time(q_len, kwargs, reason):
    q, k, v = qkv(q_len=q_len)
    causal = q_len > 1  # a decode row sees every key
    plan = streaming_plan(q_len, 48, BLOCK, causal, 1, 1)
    out = sparse_attention(q, k, v, plan, is_causal=causal, enable_gqa=True, **kwargs)
    assert rel_err(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)) < 1e-6
    (key,) = dam_compile.runtime_stats()
    assert key.startswith("dense: ") and reason in key


def test_output_is_contiguous_for_transposed_inputs():
    q = torch.randn(1, 48, 4, 16).transpose(1, 2)
    k, v = (torch.randn(1, 48, 2, 16).transpose(1, 2) for _ in range(2))
    for kernel in ("auto", "reference"):
        out = run(q, k, v, dense_plan(48, 48, BLOCK, True), kernel=kernel)
        assert out.is_contiguous()
        assert rel_err(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)) < 1e-5


def test_op_runs_the_kernel_and_passes_opcheck():
    q, k, v = kernel_inputs.inputs(q_len=48, dtype=torch.float16)
    plan = kernel_inputs.make_plan("0.5", 48, 48, 4, True)
    out = sparse_attention(q, k, v, plan, is_causal=True, enable_gqa=True, kernel="triton")
    kernel_inputs.check(out, kernel_inputs.oracle(q, k, v, plan, is_causal=True), q.dtype)
    args = (q, k, v, *plan.as_op_args(), None, None, True, True, kernel_inputs.BLOCK, 0, "triton")
    torch.library.opcheck(torch.ops.dam.sparse_attention.default, args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_paths_match_sdpa():
    q, k, v = (t.cuda() for t in qkv(q_len=256, kv_len=256, dtype=torch.bfloat16))
    plan = dense_plan(256, 256, BLOCK, True, "cuda")
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    for kernel in ("auto", "reference"):
        assert rel_err(run(q, k, v, plan, kernel=kernel), expected) < 2e-2
