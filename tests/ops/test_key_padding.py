"""``dam::key_padding`` and the attention op's use of it: an all-ones ``attention_mask`` is plain causal attention,
padding becomes per-sequence key ranges, a vector with holes keeps the mask; every kind equals masked SDPA."""

import pytest
import torch
import torch.nn.functional as F

from dam_compile.plan.structured_plans import dense_plan
from dam_compile.ops import attention as ops
from dam_compile.ops.key_padding import ALL_VALID, HOLES, RANGES, key_ranges, padding_inputs, range_mask

from dam_testing import rel_err

BLOCK = 16


def vectors(n: int = 40) -> dict[str, torch.Tensor]:
    """Key padding vectors ``[B, N]`` of each kind (``True`` = a valid key)."""
    ones = torch.ones(3, n, dtype=torch.bool)
    left, right, holes, empty = ones.clone(), ones.clone(), ones.clone(), ones.clone()
    left[1, :11], left[2, :1] = False, False
    right[0, 29:] = False
    holes[2, 5:9] = False
    empty[1] = False
    return {"every key": ones, "left padding": left, "right padding": right, "holes": holes, "an empty row": empty}


EXPECTED = {"every key": ALL_VALID, "left padding": RANGES, "right padding": RANGES, "holes": HOLES,
            "an empty row": RANGES}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_kind_and_ranges_describe_the_vector_exactly(name):
    valid = vectors()[name]
    kv_range, kind = torch.ops.dam.key_padding(valid[:, None, None, :])
    assert kind.device.type == "cpu" and int(kind) == EXPECTED[name]
    assert kv_range.dtype == torch.int32 and kv_range.shape == (3, 2)
    if int(kind) != HOLES:  # the ranges alone say which keys are valid
        assert torch.equal(range_mask(kv_range, valid.shape[-1])[:, 0, 0], valid)


def test_ranges_of_random_runs():
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        n = int(torch.randint(1, 70, (1,), generator=generator))
        start, end = sorted(torch.randint(0, n + 1, (2,), generator=generator).tolist())
        valid = torch.zeros(1, n, dtype=torch.bool)
        valid[0, start:end] = True
        kv_range, contiguous = key_ranges(valid)
        assert bool(contiguous.all())
        assert torch.equal(range_mask(kv_range, n)[:, 0, 0], valid)


def test_opcheck_key_padding():
    row = vectors()["left padding"][:, None, None, :]
    torch.library.opcheck(torch.ops.dam.key_padding.default, (row,))


def test_padding_inputs_choose_the_cheaper_exact_description():
    row, kv_range = torch.ones(2, 1, 1, 8, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.int32)
    assert padding_inputs(ALL_VALID, row, kv_range, 2) == (None, None)
    assert padding_inputs(RANGES, row, kv_range, 2) == (None, kv_range)
    assert padding_inputs(HOLES, row, kv_range, 2) == (row, None)
    mask, broadcast = padding_inputs(RANGES, row[:1], kv_range[:1], 3)
    assert mask is None and broadcast.shape == (3, 2)
    with pytest.raises(ValueError, match="padding_kind"):
        padding_inputs(7, row, kv_range, 2)


def qkv(batch=3, heads=4, kv_heads=2, n=40, dim=16, dtype=torch.float32):
    return (torch.randn(batch, heads, n, dim, dtype=dtype), torch.randn(batch, kv_heads, n, dim, dtype=dtype),
            torch.randn(batch, kv_heads, n, dim, dtype=dtype))


def masked_sdpa(q, k, v, valid):
    """What the model computed before the rewrite: SDPA with the [B, 1, N, N] causal-and-padding mask, on
    repeated K/V; rows that see no key are zeros (as the op returns them)."""
    n = q.shape[-2]
    mask = torch.ones(n, n, dtype=torch.bool).tril() & valid[:, None, None, :]
    group = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q.double(), k.repeat_interleave(group, 1).double(),
                                         v.repeat_interleave(group, 1).double(), attn_mask=mask)
    return out.nan_to_num(0.0).masked_fill(~mask.any(-1, keepdim=True), 0.0)


@pytest.mark.parametrize("name", list(EXPECTED))
@pytest.mark.parametrize("kernel, min_seq_len", [("auto", 0), ("reference", 0), ("auto", 1 << 20)],
                         ids=["dense (CPU)", "sparse reference", "dense (short)"])
def test_attention_with_the_description_equals_masked_sdpa(name, kernel, min_seq_len):
    valid = vectors()[name]
    q, k, v = qkv()
    kv_range, kind = torch.ops.dam.key_padding(valid[:, None, None, :])
    plan = dense_plan(40, 40, BLOCK, True)
    out = torch.ops.dam.sparse_attention(
        q, k, v, *plan.as_op_args(), valid[:, None, None, :], None, True, True, BLOCK, min_seq_len, kernel,
        kv_range=kv_range, padding_kind=kind)
    rows = valid.any(-1)  # a sequence with no valid key: SDPA's zeros and ours need not agree on the dtype path
    assert rel_err(out[rows], masked_sdpa(q, k, v, valid)[rows].float()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dense_path_runs_ranges_on_the_fused_kernel_without_a_mask(dtype):
    """CUDA (here the Triton interpreter) float16/bfloat16: a dense call with key ranges takes the fused kernel
    with every visible block and the ranges, equal to masked SDPA."""
    valid = vectors()["left padding"]
    q, k, v = qkv(dtype=dtype)
    kv_range, _ = key_ranges(valid)
    assert ops._fused_dense_runs(q, v)
    out = ops.dense_attention(q, k, v, None, None, True, True, kv_range, BLOCK)
    expected = masked_sdpa(q.float(), k.float(), v.float(), valid)
    assert rel_err(out.float(), expected.float()) < 2e-2


@pytest.mark.parametrize("name", ["every key", "left padding", "holes"])
def test_opcheck_sparse_attention_with_a_described_padding(name):
    valid = vectors()[name]
    q, k, v = qkv()
    kv_range, kind = torch.ops.dam.key_padding(valid[:, None, None, :])
    args = (q, k, v, *dense_plan(40, 40, BLOCK, True).as_op_args(), valid[:, None, None, :], None, True, True, BLOCK,
            0, "reference", kv_range, 0, kind)
    torch.library.opcheck(torch.ops.dam.sparse_attention.default, args)
