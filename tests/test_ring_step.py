"""A ring step: ``dam::sparse_attention_lse`` (the output and its log-sum-exp, which ring attention merges by)
against float64 attention, and ``step_plan``'s cut of a rank's plan rows to one step; two steps merged by their
log-sum-exps give the attention over both shards."""

import math

import pytest
import torch

from dam_compile.kernels import random_plan, token_mask
from dam_compile.kernels.block_sparse_launch import interpreting
from dam_compile.kernels.ring_step import blocks_of, sparse_attention_lse, step_plan

from dam_testing import dense_oracle, rel_err

KERNELS = ["reference"] + (["triton"] if interpreting() else [])  # CPU tensors: the kernel in the interpreter


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


def test_two_steps_merged_by_their_lse_are_the_attention_over_both():
    """What the ring does with a rank's queries and two key shards: each step's output weighted by its share of
    the total mass (the log-sum-exps) gives attention over the union of the steps' kept blocks."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=g) for _ in range(3))
    rows = torch.rand(1, 2, 4, 8, generator=g) < 0.6  # 4 query blocks (global 4..7) against 8 key blocks
    rows &= torch.arange(8)[None, :] <= torch.arange(4, 8)[:, None]  # a plan keeps no future block
    rows[..., 0] = True  # every row keeps the sink: no empty row
    keys = torch.randn(1, 2, 128, 16, generator=g)
    values = torch.randn(1, 2, 128, 16, generator=g)
    q_rows, q_blocks = torch.arange(4), torch.arange(4, 8)
    parts = []
    for k_blocks in (torch.arange(0, 4), torch.arange(4, 8)):  # two shards of the keys
        plan = step_plan(rows, q_rows, q_blocks, k_blocks, 16)
        k_tokens = (k_blocks[:, None] * 16 + torch.arange(16)).flatten()
        causal = bool((k_blocks == q_blocks[0]).any())  # the shard holding the diagonal runs causal
        parts.append(sparse_attention_lse(q, keys[:, :, k_tokens], values[:, :, k_tokens], plan, is_causal=causal,
                                          kernel="reference"))
    (o1, l1), (o2, l2) = parts
    total = torch.logaddexp(l1, l2)
    merged = o1 * (l1 - total).exp()[..., None] + o2 * (l2 - total).exp()[..., None]
    allowed = rows.repeat_interleave(16, -2).repeat_interleave(16, -1)  # [1, 2, 64, 128]
    q_pos, k_pos = torch.arange(64, 128), torch.arange(128)
    allowed = allowed & (k_pos[None, :] <= q_pos[:, None])
    assert rel_err(merged, dense_oracle(q, keys, values, allowed, scale=1 / math.sqrt(16))) < 1e-5


def test_step_plan_cuts_rows_to_the_step_and_skips_an_empty_one():
    rows = torch.zeros(1, 1, 2, 6, dtype=torch.bool)
    rows[0, 0, 0, [0, 4]] = True  # rank's block 0 (global 4) keeps blocks 0 and 4 (its diagonal)
    rows[0, 0, 1, [0, 5]] = True  # rank's block 1 (global 5) keeps blocks 0 and 5
    plan = step_plan(rows, torch.tensor([0, 1]), torch.tensor([4, 5]), torch.tensor([4, 5]), 16)
    partial, full = plan.block_tables(32)
    assert partial[0, 0].tolist() == [[True, False], [False, True]] and not full.any()  # diagonal: causal
    plan = step_plan(rows, torch.tensor([0, 1]), torch.tensor([4, 5]), torch.tensor([0, 1]), 16)
    partial, full = plan.block_tables(32)
    assert full[0, 0].tolist() == [[True, False], [True, False]] and not partial.any()
    assert step_plan(rows, torch.tensor([0, 1]), torch.tensor([4, 5]), torch.tensor([2, 3]), 16) is None
    assert blocks_of(torch.cat([torch.arange(32, 48), torch.arange(96, 112)]), 16).tolist() == [2, 6]
    with pytest.raises(ValueError, match="whole blocks"):
        blocks_of(torch.arange(24), 16)


def test_op_passes_opcheck():
    q, k = torch.randn(1, 4, 32, 16), torch.randn(1, 2, 32, 16)
    plan = random_plan(32, 32, 16, 1.0, 4, is_causal=True)
    args = (q, k, k, plan.kv_num_blocks, plan.kv_indices, plan.full_kv_num_blocks, plan.full_kv_indices, None, True,
            True, 16, "reference")
    torch.library.opcheck(torch.ops.dam.sparse_attention_lse.default, args)
