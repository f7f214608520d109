"""The PyTorch block-sparse reference against an independent float64 dense oracle."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dam_compile.plan.block_plan import BlockSparsePlan, PlanError
from dam_compile.plan.reference import block_sparse_attention_reference, token_mask
from dam_compile.plan.structured_plans import dense_plan, streaming_plan
from dam_compile.plan.reference import rows_per_chunk

from dam_testing import dense_oracle, rel_err, tolerance
from kernel_inputs import listed_pattern_plan

BLOCK = 16


def random_plan(batch, heads, q_len, kv_len, is_causal, density, seed):
    """Random kept blocks among the visible ones; some rows may keep nothing."""
    g = torch.Generator().manual_seed(seed)
    visible, full = dense_plan(q_len, kv_len, BLOCK, is_causal).block_tables(kv_len)
    visible = visible | full
    keep = (torch.rand(batch, heads, *visible.shape[2:], generator=g) < density) & visible
    split = torch.rand(keep.shape, generator=g) < 0.5
    return BlockSparsePlan.from_block_tables(keep & ~(full & split), BLOCK, keep & full & split)


def make_mask(kind, batch, heads, q_len, kv_len, dtype):
    if kind is None:
        return None
    if kind == "bool2d":
        return torch.rand(q_len, kv_len) < 0.8
    if kind == "bool4d":
        return torch.rand(batch, 1, q_len, kv_len) < 0.8
    return torch.randn(1, heads, q_len, kv_len).to(dtype)


def check(q, k, v, plan, *, is_causal, attn_mask=None, scale=None, enable_gqa=False, dtype=torch.float32):
    out = block_sparse_attention_reference(
        q, k, v, plan, attn_mask=attn_mask, scale=scale, is_causal=is_causal, enable_gqa=enable_gqa
    )
    allowed = token_mask(plan, q.shape[2], k.shape[2], is_causal)
    expected = dense_oracle(q, k, v, allowed, attn_mask, scale)
    assert out.dtype == q.dtype and out.is_contiguous()
    assert rel_err(out, expected) < tolerance(dtype)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_reference_matches_float64_oracle(dtype, is_causal, kv_heads):
    b, h, q_len, kv_len, d = 2, 4, 70, 70, 32
    torch.manual_seed(kv_heads * 2 + is_causal)  # fresh inputs per case, the same whatever ran before (xdist)
    q = torch.randn(b, h, q_len, d, dtype=dtype)
    k, v = (torch.randn(b, kv_heads, kv_len, d, dtype=dtype) for _ in range(2))
    plan = random_plan(b, h, q_len, kv_len, is_causal, 0.6, seed=kv_heads)
    check(q, k, v, plan, is_causal=is_causal, enable_gqa=kv_heads != h, dtype=dtype)


@settings(max_examples=50, deadline=None)
@given(
    b=st.integers(1, 2), kv_heads=st.sampled_from([1, 2]), group=st.sampled_from([1, 2]),
    q_len=st.integers(1, 50), kv_len=st.integers(1, 50), d=st.sampled_from([8, 16, 24]),
    is_causal=st.booleans(), mask=st.sampled_from([None, "bool2d", "bool4d", "float4d"]),
    scale=st.sampled_from([None, 0.3]), density=st.sampled_from([1.0, 0.5, 0.1]), transposed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_reference_matrix(b, kv_heads, group, q_len, kv_len, d, is_causal, mask, scale, density, transposed, seed):
    torch.manual_seed(seed)
    h = kv_heads * group
    if transposed:  # HF hands [B, L, H, D] storage viewed as [B, H, L, D]
        q = torch.randn(b, q_len, h, d).transpose(1, 2)
        k, v = (torch.randn(b, kv_len, kv_heads, d).transpose(1, 2) for _ in range(2))
    else:
        q = torch.randn(b, h, q_len, d)
        k, v = (torch.randn(b, kv_heads, kv_len, d) for _ in range(2))
    plan = random_plan(b, h, q_len, kv_len, is_causal, density, seed)
    attn_mask = make_mask(mask, b, h, q_len, kv_len, torch.float32)
    check(q, k, v, plan, is_causal=is_causal, attn_mask=attn_mask, scale=scale, enable_gqa=group > 1)


def test_rows_without_kept_keys_are_zero_not_nan():
    q, k, v = (torch.randn(1, 2, 48, 16) for _ in range(3))
    table = torch.zeros(1, 2, 3, 3, dtype=torch.bool)
    table[0, 0, 1, 0] = True  # only query block 1 of head 0 keeps anything
    out = block_sparse_attention_reference(q, k, v, BlockSparsePlan.from_block_tables(table, BLOCK))
    assert not torch.isnan(out).any()
    assert out[0, 1].abs().max() == 0 and out[0, 0, :16].abs().max() == 0 and out[0, 0, 32:].abs().max() == 0
    assert out[0, 0, 16:32].abs().max() > 0


def test_chunking_bounds_memory_and_keeps_results():
    b, h, n, d = 1, 4, 160, 16
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    plan = streaming_plan(n, n, BLOCK, True, 1, 2)
    whole = block_sparse_attention_reference(q, k, v, plan, is_causal=True)
    budget = BLOCK * b * h * n  # one block of rows at a time
    assert rows_per_chunk(b, h, n, BLOCK, budget) * b * h * n <= budget
    chunked = block_sparse_attention_reference(q, k, v, plan, is_causal=True, max_chunk_elements=budget)
    assert torch.equal(whole, chunked)


def test_plan_is_validated_against_inputs():
    q = torch.randn(1, 2, 64, 16)
    with pytest.raises(PlanError, match="query blocks"):
        block_sparse_attention_reference(q, q, q, dense_plan(32, 64, BLOCK, True), is_causal=True)
    with pytest.raises(ValueError, match="enable_gqa"):
        block_sparse_attention_reference(q, q[:, :1], q[:, :1], dense_plan(64, 64, BLOCK, True))


def test_token_mask_follows_pattern_lists():
    """The token mask the oracle uses, checked by hand: i sees j (j <= i) iff i - j or j is listed."""
    plan = listed_pattern_plan(2, 40, 40, "cpu")
    mask = token_mask(plan, 40, 40, True)
    for h, (offsets, cols) in enumerate([({0, 1, 17}, {0, 5}), ({0, 2, 20}, {0, 6})]):
        for i in range(40):
            for j in range(40):
                assert bool(mask[0, h, i, j]) == (j <= i and (i - j in offsets or j in cols)), (h, i, j)
