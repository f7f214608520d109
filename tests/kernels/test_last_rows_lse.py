"""Per-key-block log-sum-exp of chosen query rows (the last query block: the adaptive estimator's exact mass;
rows sampled in every query block: the sampled estimator's): the Triton kernel against its float64 PyTorch
definition, over a shape matrix."""

import math

import pytest
import torch

from dam_compile.kernels.block_sparse_launch import interpreting
from dam_compile.kernels.last_rows_lse import (
    exact_query_rows,
    kernel_runs,
    last_rows_block_lse,
    last_rows_block_lse_reference,
    rows_block_lse_reference,
    sampled_query_positions,
    sampled_rows_block_lse,
    sampled_rows_block_lse_reference,
)

DEVICES = (["cpu"] if interpreting() else []) + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "b, h, kvh, q_len, kv_len, d, block",
    [(1, 4, 2, 200, 200, 32, 32), (2, 4, 1, 70, 300, 64, 64), (1, 8, 2, 20, 20, 24, 16), (1, 2, 2, 300, 300, 128, 128)],
)
def test_kernel_matches_float64_definition(device, dtype, causal, b, h, kvh, q_len, kv_len, d, block):
    g = torch.Generator().manual_seed(q_len * 31 + kv_len)
    q = (2 * torch.randn(b, h, q_len, d, generator=g)).to(device=device, dtype=dtype)
    k = (2 * torch.randn(b, kvh, kv_len, d, generator=g)).to(device=device, dtype=dtype)
    assert kernel_runs(q, block)
    out = last_rows_block_lse(q, k, block, causal, d**-0.5)
    want = last_rows_block_lse_reference(q.double(), k.double(), block, causal, d**-0.5).float()
    rows, nk = exact_query_rows(q_len, block), math.ceil(kv_len / block)
    assert out.shape == (b, kvh, h // kvh * rows, nk)
    seen = torch.isfinite(want)
    assert torch.equal(torch.isfinite(out), seen)  # -inf exactly where a query sees none of the block
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert ((out - want)[seen].abs().max() / want[seen].abs().max()) < tol
    if causal and q_len == kv_len:
        assert not seen.all()  # the last block's queries see part of their own block only


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "b, h, kvh, q_len, kv_len, d, block, per_block",
    [(1, 4, 2, 200, 200, 32, 32, 4), (2, 4, 1, 70, 300, 64, 64, 8), (1, 8, 2, 20, 20, 24, 16, 16),
     (1, 2, 2, 300, 300, 128, 128, 2)],
)
def test_sampled_rows_kernel_matches_float64_definition(device, dtype, causal, b, h, kvh, q_len, kv_len, d, block,
                                                        per_block):
    g = torch.Generator().manual_seed(q_len * 37 + kv_len)
    q = (2 * torch.randn(b, h, q_len, d, generator=g)).to(device=device, dtype=dtype)
    k = (2 * torch.randn(b, kvh, kv_len, d, generator=g)).to(device=device, dtype=dtype)
    out = sampled_rows_block_lse(q, k, block, per_block, causal, d**-0.5)
    want = sampled_rows_block_lse_reference(q.double(), k.double(), block, per_block, causal, d**-0.5).float()
    assert out.shape == (b, kvh, h // kvh * math.ceil(q_len / block) * per_block, math.ceil(kv_len / block))
    seen = torch.isfinite(want)
    assert torch.equal(torch.isfinite(out), seen)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert ((out - want)[seen].abs().max() / want[seen].abs().max()) < tol


@pytest.mark.parametrize("loop", [1, 4])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.slow
def test_gpu_sized_programs_give_the_same_values(monkeypatch, causal, loop):
    """On a GPU a program takes 64 rows and walks key blocks one at a time: with tiles that cut a block's rows
    apart (some tiles seeing none of a key block), one key block a step, ``loop`` steps a program (past the last
    block too: 7 blocks), the values are those of the interpreter's whole tiles."""
    import dam_compile.kernels.last_rows_lse as lse

    if not interpreting():
        pytest.skip("the interpreter's program shape is what this compares against")
    q, k = torch.randn(1, 4, 200, 32), torch.randn(1, 2, 200, 32)
    whole = sampled_rows_block_lse(q, k, 32, 8, causal, 0.2)
    monkeypatch.setattr(lse, "INTERPRETER_ROWS_PER_PROGRAM", 16)
    monkeypatch.setattr(lse, "ROWS_PER_PROGRAM", 16)
    monkeypatch.setattr(lse, "key_blocks_per_program", lambda *sizes: 1)
    monkeypatch.setattr(lse, "loop_blocks_per_program", lambda *sizes: loop)
    torch.testing.assert_close(sampled_rows_block_lse(q, k, 32, 8, causal, 0.2), whole)
    torch.testing.assert_close(last_rows_block_lse(q, k, 32, causal, 0.2), last_rows_block_lse_reference(q, k, 32, causal, 0.2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [True, False])
def test_a_shard_of_blocks_scores_its_rows_at_their_places_in_the_sequence(device, causal):
    """A context-parallel rank holds query blocks 1 and 6 of an 8-block sequence (head-tail order): its sampled
    rows' values are those of the same rows of the whole sequence."""
    q, k = torch.randn(1, 4, 256, 32, device=device), torch.randn(1, 2, 256, 32, device=device)
    blocks = torch.tensor([1, 6])
    shard = torch.cat([q[:, :, 32:64], q[:, :, 192:224]], dim=2)
    whole = sampled_rows_block_lse(q, k, 32, 4, causal, 0.2).unflatten(2, (2, 8, 4))  # [B, KVH, G, Mq, rows]
    got = sampled_rows_block_lse(shard, k, 32, 4, causal, 0.2, block_map=blocks.to(device)).unflatten(2, (2, 2, 4))
    torch.testing.assert_close(got, whole[:, :, :, blocks])
    reference = sampled_rows_block_lse_reference(shard, k, 32, 4, causal, 0.2, block_map=blocks)
    torch.testing.assert_close(got.flatten(2, 4), reference, atol=1e-4, rtol=1e-4)


def test_sampled_positions_end_each_part_of_every_block():
    assert sampled_query_positions(300, 128, 4).tolist() == [31, 63, 95, 127, 159, 191, 223, 255, 287, 299, 299, 299]
    assert sampled_query_positions(64, 64, 1).tolist() == [63]
    with pytest.raises(ValueError, match="per_block"):
        sampled_query_positions(64, 64, 3)


def test_row_definition_is_plain_attention():
    """The reference's log-sum-exps are those of the full score matrix's rows, cut at block edges."""
    q, k = torch.randn(1, 4, 50, 8, dtype=torch.float64), torch.randn(1, 2, 50, 8, dtype=torch.float64)
    positions = torch.tensor([3, 17, 49])
    lse = rows_block_lse_reference(q, k, positions, 16, True, 0.5)  # [1, 2, 2 * 3, 4]
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.5
    scores = scores.masked_fill(torch.ones(50, 50, dtype=torch.bool).triu(1), float("-inf"))
    for head in range(4):
        for i, pos in enumerate(positions.tolist()):
            row = lse[0, head // 2, (head % 2) * 3 + i]
            for block in range(4):
                want = scores[0, head, pos, block * 16:(block + 1) * 16].logsumexp(-1).float()
                assert torch.allclose(row[block], want, rtol=1e-5) or (row[block] == want == float("-inf"))


def test_unsupported_block_size_takes_the_reference():
    q, k = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    assert not kernel_runs(q, 24)
    torch.testing.assert_close(last_rows_block_lse(q, k, 24, True, 0.25),
                               last_rows_block_lse_reference(q, k, 24, True, 0.25))


@pytest.mark.parametrize("device", DEVICES)
def test_op_passes_opcheck(device):
    q, k = torch.randn(1, 4, 40, 16, device=device), torch.randn(1, 2, 40, 16, device=device)
    torch.library.opcheck(torch.ops.dam.last_rows_block_lse.default, (q, k, 16, True, 0.25))
    torch.library.opcheck(torch.ops.dam.sampled_rows_block_lse.default, (q, k, 16, 4, True, 0.25))
    blocks = torch.tensor([2, 0, 1], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.dam.sampled_rows_block_lse.default, (q[:, :, :48], k, 16, 4, True, 0.25, blocks))
