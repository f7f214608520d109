"""The fused Triton kernel through its launcher (``triton_block_sparse_attention``) against a float64 dense oracle
(same mask expanded to tokens) and against the memory-bounded PyTorch reference. On the CPU it runs in Triton's
interpreter at small shapes; the GPU class repeats the checks at real tile sizes for every tuned config.

Every launch writes into a NaN-poisoned buffer, so an unwritten element fails ``rel_err``.
"""

import math

import pytest
import torch

from dam_compile.plan.block_plan import BlockSparsePlan, PlanError
from dam_compile.plan.reference import block_sparse_attention_reference, token_mask
from dam_compile.plan.structured_plans import dense_plan
from dam_compile.kernels.block_sparse_launch import triton_block_sparse_attention
from dam_compile.kernels.block_sparse_launch import _TUNE_CONFIGS, _fits
from dam_compile.plan.dam_patterns import extended_mask, match_patterns, true_mask
from dam_compile.plan.pattern_plan import pattern_plan as extend_patterns

from dam_testing import rel_err, tolerance
from kernel_inputs import (
    BLOCK, DEVICE, check, inputs, launch, listed_pattern_plan, make_plan, oracle, random_plan,
)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kind", ["dense", "0.5", "0.1", "diagonal", "sink"])
def test_plans(kind, causal):
    q, k, v = inputs()
    plan = make_plan(kind, 72, 72, 4, causal)
    out = launch(q, k, v, plan, is_causal=causal)
    check(out, oracle(q, k, v, plan, is_causal=causal), q.dtype)


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes_and_head_dims(dtype, head_dim):
    q, k, v = inputs(q_len=40, d=head_dim, dtype=dtype)
    plan = make_plan("0.5", 40, 40, 4, True)
    out = launch(q, k, v, plan, is_causal=True, scale=0.3)
    check(out, oracle(q, k, v, plan, is_causal=True, scale=0.3), dtype)


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.slow
def test_gqa_reads_shared_kv_heads(group):
    q, k, v = inputs(h=8, kvh=8 // group)
    plan = make_plan("0.5", 72, 72, 8, True)
    out = launch(q, k, v, plan, is_causal=True)
    expected = oracle(q, k, v, plan, is_causal=True)
    check(out, expected, q.dtype)
    # The same K/V already repeated per query head (what HF passes with a padded batch) gives the same answer.
    repeated = launch(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), plan, is_causal=True)
    check(repeated, expected, q.dtype)


@pytest.mark.parametrize("aligned_to_end", [False, True])
@pytest.mark.parametrize("causal", [True, False])
def test_fewer_queries_than_keys(causal, aligned_to_end):
    q, k, v = inputs(q_len=40, kv_len=88)
    offset = 88 - 40 if aligned_to_end else 0
    plan = make_plan("0.5", 40, 88, 4, causal, q_offset=offset)
    out = launch(q, k, v, plan, is_causal=causal, q_offset=offset)
    check(out, oracle(q, k, v, plan, is_causal=causal, q_offset=offset), q.dtype)


def test_top_left_alignment_is_sdpa_causal():
    q, k, v = inputs(q_len=40, kv_len=88)
    out = launch(q, k, v, dense_plan(40, 88, BLOCK, True, DEVICE), is_causal=True)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), is_causal=True, enable_gqa=True
    )
    check(out, expected.cpu(), q.dtype)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.slow
def test_padded_batch_with_valid_key_ranges(side):
    """Per-sequence valid key ranges need no mask tensor and equal the bool-mask answer."""
    q, k, v = inputs(b=3, q_len=56)
    lengths = torch.tensor([56, 37, 9])
    starts = 56 - lengths if side == "left" else torch.zeros_like(lengths)
    kv_range = torch.stack([starts, starts + lengths], 1).to(torch.int32).to(DEVICE)
    plan = make_plan("dense", 56, 56, 4, False)
    out = launch(q, k, v, plan, is_causal=False, kv_range=kv_range)
    check(out, oracle(q, k, v, plan, is_causal=False, kv_range=kv_range), q.dtype)
    keys = torch.arange(56)
    bool_mask = ((keys >= starts[:, None]) & (keys < (starts + lengths)[:, None]))[:, None, None, :].to(DEVICE)
    with_mask = launch(q, k, v, plan, is_causal=False, attn_mask=bool_mask)
    assert rel_err(out.float(), with_mask.float()) < 1e-2


@pytest.mark.parametrize("mask_kind", ["bool", "float", "hf_min"])
def test_attention_masks(mask_kind):
    q, k, v = inputs(b=2, q_len=48)
    plan = make_plan("0.5", 48, 48, 4, False)
    if mask_kind == "bool":
        mask = torch.rand(2, 1, 48, 48, device=DEVICE) < 0.7
    elif mask_kind == "float":
        mask = torch.randn(2, 4, 48, 48, device=DEVICE).to(q.dtype)
    else:  # HF's additive padding mask: dtype minimum where masked, one sequence fully masked on some rows
        mask = torch.zeros(2, 1, 48, 48, device=DEVICE, dtype=q.dtype)
        mask[1, :, :, 30:] = torch.finfo(q.dtype).min
        mask[1, :, :5, :] = torch.finfo(q.dtype).min
    out = launch(q, k, v, plan, is_causal=False, attn_mask=mask)
    check(out, oracle(q, k, v, plan, is_causal=False, attn_mask=mask), q.dtype)


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_key_padding_row_with_causal(mask_kind):
    """What the pass hands the op for a causal-and-padding mask: is_causal and the key row [B, 1, 1, N] (a
    broadcast row), left padding and scattered holes."""
    q, k, v = inputs(b=2, q_len=48)
    plan = make_plan("0.5", 48, 48, 4, True)
    keep = torch.rand(2, 48, device=DEVICE) < 0.8
    keep[1, :13] = False
    mask = keep[:, None, None, :]
    if mask_kind == "float":
        mask = torch.zeros(2, 1, 1, 48, device=DEVICE, dtype=q.dtype).masked_fill(~mask, torch.finfo(q.dtype).min)
    out = launch(q, k, v, plan, is_causal=True, attn_mask=mask)
    check(out, oracle(q, k, v, plan, is_causal=True, attn_mask=mask), q.dtype)


def test_non_contiguous_inputs():
    """HF hands [B, L, H, E] projections transposed to [B, H, L, E]."""
    b, h, kvh, n, d = 2, 4, 2, 72, 64
    q = torch.randn(b, n, h, d, dtype=torch.bfloat16, device=DEVICE).transpose(1, 2)
    k = torch.randn(b, n, kvh, d, dtype=torch.bfloat16, device=DEVICE).transpose(1, 2)
    v = torch.randn(b, kvh, d, n, dtype=torch.bfloat16, device=DEVICE).transpose(2, 3)
    plan = make_plan("0.5", n, n, h, True)
    out = launch(q, k, v, plan, is_causal=True)
    check(out, oracle(q, k, v, plan, is_causal=True), q.dtype)


def test_rows_without_kept_blocks_are_zero():
    q, k, v = inputs(q_len=64)
    table = torch.rand(1, 4, 4, 4, device=DEVICE) < 0.6
    table[:, :, 1] = False  # query block 1 keeps nothing, in every head
    plan = BlockSparsePlan.from_block_tables(table, BLOCK)
    out, lse = launch(q, k, v, plan, is_causal=True, return_lse=True)
    check(out, oracle(q, k, v, plan, is_causal=True), q.dtype)
    assert torch.equal(out[:, :, 16:32].cpu(), torch.zeros_like(out[:, :, 16:32]).cpu())
    assert torch.isneginf(lse[:, :, 16:32]).all()


def test_log_sum_exp():
    q, k, v = inputs(q_len=40, dtype=torch.float32)
    plan = make_plan("0.5", 40, 40, 4, True)
    _, lse = launch(q, k, v, plan, is_causal=True, return_lse=True)
    allowed = token_mask(plan, 40, 40, True).cpu()
    scores = q.double().cpu() @ k.double().cpu().repeat_interleave(2, 1).transpose(-1, -2) / math.sqrt(64)
    expected = scores.masked_fill(~allowed, float("-inf")).logsumexp(-1)
    assert rel_err(lse.cpu(), expected) < 1e-5


def test_token_exact_pattern():
    q, k, v = inputs(q_len=72)
    plan = listed_pattern_plan(4, 72, 72)
    out = launch(q, k, v, plan, is_causal=True)
    expected = oracle(q, k, v, plan, is_causal=True)
    check(out, expected, q.dtype)
    # The pattern really masks: without it the answer differs.
    plain = BlockSparsePlan(plan.kv_num_blocks, plan.kv_indices, BLOCK)
    assert rel_err(launch(q, k, v, plain, is_causal=True).cpu(), expected) > 0.1


def dam_plan(heads, pcl, q_len, kv_len, block, device=DEVICE, seed=0):
    """A calibrated-style DAM plan: random true mask at ``pcl``, matched patterns, extended (plan.pattern_plan)."""
    g = torch.Generator().manual_seed(seed)
    attention = (torch.rand(heads, pcl, pcl, generator=g) ** 4).tril()
    patterns = match_patterns(true_mask(attention, 0.5, 0.3), 0.5).to(device)
    plan = extend_patterns(patterns.diagonals, patterns.columns, patterns.corner, q_len, kv_len, block, True)
    return plan, patterns


@pytest.mark.parametrize("pcl", [8, 24])
def test_calibrated_plan_with_true_mask_corner(pcl):
    """Inside the PCL corner the true mask decides, outside the pattern lists: the kernel equals the oracle on
    the extended DAM mask, which equals DAM's definition token by token."""
    q, k, v = inputs(q_len=72)
    plan, patterns = dam_plan(4, pcl, 72, 72, BLOCK)
    assert torch.equal(token_mask(plan, 72, 72, True)[0].cpu(), extended_mask(patterns, 72, 72, True).cpu())
    out = launch(q, k, v, plan, is_causal=True)
    check(out, oracle(q, k, v, plan, is_causal=True), q.dtype)
    without_corner = BlockSparsePlan(*plan.as_op_args()[:2], BLOCK, *plan.as_op_args()[2:6])
    if not torch.equal(token_mask(without_corner, 72, 72, True), token_mask(plan, 72, 72, True)):
        assert rel_err(launch(q, k, v, without_corner, is_causal=True).cpu(), oracle(q, k, v, plan, is_causal=True)) > 1e-2


def test_matches_memory_bounded_reference():
    q, k, v = inputs(b=2, q_len=64, kv_len=80)
    plan = make_plan("0.5", 64, 80, 4, True)
    mask = torch.rand(2, 1, 64, 80, device=DEVICE) < 0.8
    out = launch(q, k, v, plan, is_causal=True, attn_mask=mask)
    ref = block_sparse_attention_reference(
        q.float(), k.float(), v.float(), plan, attn_mask=mask, is_causal=True, enable_gqa=True, max_chunk_elements=4096
    )
    assert rel_err(out.float(), ref) < tolerance(q.dtype)


def test_bad_arguments_raise_clear_errors():
    q, k, v = inputs(q_len=32)
    plan = dense_plan(32, 32, BLOCK, True, DEVICE)
    with pytest.raises(PlanError, match="kv_num_blocks"):
        triton_block_sparse_attention(q, k, v, dense_plan(48, 32, BLOCK, True, DEVICE), enable_gqa=True)
    with pytest.raises(ValueError, match="enable_gqa"):
        triton_block_sparse_attention(q, k, v, plan)
    with pytest.raises(ValueError, match="kv_range"):
        triton_block_sparse_attention(q, k, v, plan, enable_gqa=True, kv_range=torch.zeros(1, 2, device=DEVICE))
    with pytest.raises(ValueError, match="attn_mask"):
        triton_block_sparse_attention(q, k, v, plan, enable_gqa=True, attn_mask=torch.zeros(32, 32, device=DEVICE))
    with pytest.raises(ValueError, match="key"):
        triton_block_sparse_attention(q, k.float(), v, plan, enable_gqa=True)
    bad = BlockSparsePlan(plan.kv_num_blocks, plan.kv_indices + 5, BLOCK, plan.full_kv_num_blocks, plan.full_kv_indices)
    with pytest.raises(PlanError, match="out of range"):
        triton_block_sparse_attention(q, k, v, bad, enable_gqa=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
class TestOnGPU:
    """Real tile sizes: every tuned config that fits a 128 plan block, and the autotuned choice."""

    @pytest.mark.parametrize("config", [c for c in _TUNE_CONFIGS if _fits(c, 128, 128)], ids=str)
    def test_each_tuned_config(self, config):
        q, k, v = inputs(b=2, h=8, kvh=2, q_len=1000, kv_len=1000, d=128)
        plan = random_plan(1000, 1000, 128, 0.5, 8, True, "cuda")
        out = torch.full_like(q, float("nan"))
        triton_block_sparse_attention(q, k, v, plan, is_causal=True, enable_gqa=True, out=out, config=config)
        check(out, oracle(q, k, v, plan, is_causal=True), q.dtype)

    def test_calibrated_plan_at_real_tiles(self):
        q, k, v = inputs(h=8, kvh=2, q_len=1500, d=128)
        plan, _ = dam_plan(8, 128, 1500, 1500, 128, "cuda")
        check(launch(q, k, v, plan, is_causal=True), oracle(q, k, v, plan, is_causal=True), q.dtype)

    @pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
    def test_autotuned_dense_matches_sdpa(self, head_dim):
        q, k, v = inputs(h=8, kvh=2, q_len=2048, d=head_dim, dtype=torch.float16)
        out = launch(q, k, v, dense_plan(2048, 2048, 128, True, "cuda"), is_causal=True)
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        assert rel_err(out.float(), expected.float()) < 5e-3
