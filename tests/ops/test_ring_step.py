"""A ring step: ``dam::sparse_attention_lse`` (the output and its log-sum-exp, which ring attention merges by)
against float64 attention, and ``RankRows``: a rank's rows of the whole sequence's plan, attended shard by shard
and merged by log-sum-exp, give the rows of the whole sequence's attention (block-level plans, and the calibrated
source's token pattern moved to each shard's keys)."""


import sys
from pathlib import Path

import pytest
import torch

from dam_compile.plan.reference import token_mask
from dam_compile.kernels.block_sparse_launch import interpreting
from dam_compile.plan.pattern_plan import pattern_plan
from dam_compile.plan.block_plan import PATTERN_PAD
from dam_compile.plan.dam_patterns import HeadPatterns
from dam_compile.ops.ring_step import RankRows, StepOptions, blocks_of, merge, sparse_attention_lse

from dam_testing import dense_oracle, rel_err

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # bench_plans: the random plans
from bench_plans import random_plan  # noqa: E402

KERNELS = ["reference"] + (["triton"] if interpreting() else [])  # CPU tensors: the kernel in the interpreter
N, BLOCK = 128, 16
# Head-tail load balancing of 128 tokens over 2 ranks: rank 0 holds chunks 0 and 3 of 32 tokens.
RANK0 = torch.cat([torch.arange(0, 32), torch.arange(96, 128)])
RANK1 = torch.arange(32, 96)


def oracle_lse(q, k, allowed, scale):
    group = q.shape[1] // k.shape[1]
    scores = (q.double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2)) * scale
    return scores.masked_fill(~allowed, float("-inf")).logsumexp(-1)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("causal", [True, False])
def test_output_and_lse_match_float64(kernel, causal):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 96, 32, generator=g) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    plan = random_plan(96, 96, 16, 0.4, 4, is_causal=causal, generator=g)
    out, lse = sparse_attention_lse(q, k, v, plan, scale=0.2, is_causal=causal, enable_gqa=True, kernel=kernel)
    allowed = token_mask(plan, 96, 96, causal)
    assert rel_err(out, dense_oracle(q, k, v, allowed, scale=0.2)) < 1e-5
    want = oracle_lse(q, k, allowed, 0.2)
    seen = torch.isfinite(want)
    assert torch.equal(torch.isfinite(lse), seen)
    assert (lse.double() - want)[seen].abs().max() < 1e-4


def ring_of_rank(rows: RankRows, q, k, v, kernel: str):
    """Rank 0's attention over both shards of the keys (its own, then rank 1's), merged as the ring does."""
    options = StepOptions(None, k.shape[1] != q.shape[1], kernel)
    pieces = []
    for shard in (RANK0, RANK1):
        out, lse, _ = rows.attend(q[:, :, RANK0], k[:, :, shard], v[:, :, shard], 0, shard, options)
        pieces.append((out, lse))
    return merge(pieces, pieces[0][0].shape, q)[0]


@pytest.mark.parametrize("kernel", KERNELS)
def test_block_rows_over_two_shards_are_the_whole_attention(kernel):
    """A random causal plan's rows of rank 0 (two chunks), each shard attended in runs, merged: the whole
    sequence's sparse attention at rank 0's positions."""
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(1, 4, N, 16, generator=g), torch.randn(1, 2, N, 16, generator=g), torch.randn(1, 2, N, 16, generator=g)
    plan = random_plan(N, N, BLOCK, 0.5, 4, is_causal=True, generator=g)
    partial, full = plan.block_tables(N)
    blocks = blocks_of(RANK0, BLOCK)
    rows = RankRows(partial[:, :, blocks], full[:, :, blocks], RANK0, BLOCK)
    want = dense_oracle(q, k, v, token_mask(plan, N, N, True))[:, :, RANK0]
    assert rel_err(ring_of_rank(rows, q, k, v, kernel), want) < 1e-5


@pytest.mark.parametrize("kernel", KERNELS)
def test_calibrated_rows_move_the_token_pattern_to_each_shard(kernel):
    """A calibrated token pattern (diagonals, columns, the PCL corner) in global positions: cut per run of
    keys, its columns and corner moved to the run's start, the merged result is the whole sequence's."""
    g = torch.Generator().manual_seed(7)
    q, k, v = torch.randn(1, 4, N, 16, generator=g), torch.randn(1, 2, N, 16, generator=g), torch.randn(1, 2, N, 16, generator=g)
    pad = PATTERN_PAD
    diagonals = torch.tensor([[0, 3, 40], [0, 17, pad], [1, 2, 64], [0, pad, pad]], dtype=torch.int32)
    columns = torch.tensor([[0, 40, 70], [5, pad, pad], [33, 34, pad], [100, pad, pad]], dtype=torch.int32)
    corner = torch.rand(4, 48, 48, generator=g) < 0.3
    plan = pattern_plan(diagonals, columns, corner, N, N, BLOCK, True)
    partial, full = plan.block_tables(N)
    blocks = blocks_of(RANK0, BLOCK)
    rows = RankRows(partial[:, :, blocks], full[:, :, blocks], RANK0, BLOCK, HeadPatterns(diagonals, columns, corner))
    want = dense_oracle(q, k, v, token_mask(plan, N, N, True))[:, :, RANK0]
    assert rel_err(ring_of_rank(rows, q, k, v, kernel), want) < 1e-5


def test_cut_keeps_partial_and_full_and_skips_an_empty_pair():
    partial = torch.zeros(1, 1, 2, 6, dtype=torch.bool)
    full = torch.zeros(1, 1, 2, 6, dtype=torch.bool)
    partial[0, 0, 0, 4] = partial[0, 0, 1, 5] = True  # the rank's blocks (global 4, 5) keep their diagonals
    full[0, 0, :, 0] = True  # and the sink
    rows = RankRows(partial, full, torch.arange(64, 96), BLOCK)
    plan = rows.cut(0, 32, 64, 32)  # against their own keys
    got_partial, got_full = plan.block_tables(32)
    assert got_partial[0, 0].tolist() == [[True, False], [False, True]] and not got_full.any()
    got_partial, got_full = rows.cut(0, 32, 0, 32).block_tables(32)  # against the first keys: the sink
    assert got_full[0, 0].tolist() == [[True, False], [True, False]] and not got_partial.any()
    assert rows.cut(0, 32, 32, 32) is None
    assert blocks_of(torch.cat([torch.arange(32, 48), torch.arange(96, 112)]), 16).tolist() == [2, 6]
    with pytest.raises(ValueError, match="whole blocks"):
        blocks_of(torch.arange(24), 16)


def test_merge_of_no_piece_is_an_empty_row():
    like = torch.randn(1, 2, 8, 4)
    out, lse = merge([], (1, 2, 8, 4), like)
    assert not out.any() and torch.isinf(lse).all()


def test_op_passes_opcheck():
    q, k = torch.randn(1, 4, 32, 16), torch.randn(1, 2, 32, 16)
    plan = random_plan(32, 32, 16, 1.0, 4, is_causal=True)
    args = (q, k, k, plan.kv_num_blocks, plan.kv_indices, plan.full_kv_num_blocks, plan.full_kv_indices, None, None,
            None, None, True, True, 16, 0, "reference")
    torch.library.opcheck(torch.ops.dam.sparse_attention_lse.default, args)
