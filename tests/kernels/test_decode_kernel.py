"""The split-KV sparse decode kernel (``triton_sparse_decode``) and its merge of the splits against float64
oracles; the plans it runs are ``dynamic/test_decode_plan.py``'s."""

import pytest
import torch
import triton
import triton.language as tl

from dam_compile.plan.block_plan import BlockSparsePlan
from dam_compile.kernels.common import interpreting
from dam_compile.kernels.decode_kernel import _merge_rows, merge_partials, triton_sparse_decode
from dam_compile.plan.reference import block_sparse_attention_reference

from dam_testing import dense_oracle, rel_err, tolerance
from decode_inputs import qkv, token_allowed

DEVICES = (["cpu"] if interpreting() else []) + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "b, h, kvh, kv_len, d, block",
    [(1, 4, 2, 200, 16, 16), (2, 4, 4, 96, 32, 32), (1, 8, 2, 257, 64, 64), (3, 2, 1, 33, 128, 16)],
)
@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_decode_kernel_matches_oracle(device, dtype, b, h, kvh, kv_len, d, block, mask):
    q, k, v = qkv(b, h, kvh, kv_len, d, dtype, device)
    nk = -(-kv_len // block)
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(b, h, nk, generator=g) < 0.5
    keep[..., -1] = True  # the row's own block
    counts = keep.sum(-1, dtype=torch.int32)[..., None]
    indices = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True).to(torch.int32)[:, :, None]
    attn_mask = None
    if mask:
        valid = torch.rand(b, 1, 1, kv_len, generator=g) < 0.8
        valid[..., -1] = True
        attn_mask = valid if mask == "bool" else torch.zeros(valid.shape).masked_fill(~valid, float("-inf")).to(dtype)
        attn_mask = attn_mask.to(device)
    counts, indices = counts.to(device), indices.to(device)
    out = triton_sparse_decode(q, k, v, counts, indices, block, attn_mask=attn_mask, enable_gqa=kvh != h)
    allowed = token_allowed(counts.cpu(), indices.cpu(), block, kv_len).to(device)
    expected = dense_oracle(q, k, v, allowed, attn_mask)
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_err(out, expected) < tolerance(dtype)
    plan = BlockSparsePlan(counts, indices, block)
    ref = block_sparse_attention_reference(q, k, v, plan, attn_mask=attn_mask, enable_gqa=kvh != h)
    assert rel_err(out, ref) < tolerance(dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_kernel_long_cache_with_heads_keeping_different_blocks(device):
    """A cache of 1024 blocks: splits of 32 blocks (a program's whole bit word), each query head of a GQA group
    keeping its own blocks (a block is read if any head keeps it, scored only where a head does)."""
    b, h, kvh, kv_len, d, block = 1, 4, 1, 1024 * 16, 16, 16
    q, k, v = qkv(b, h, kvh, kv_len, d, torch.float32, device)
    g = torch.Generator().manual_seed(4)
    keep = torch.rand(b, h, 1024, generator=g) < torch.tensor([0.02, 0.3, 0.0, 0.9])[None, :, None]
    keep[0, 3, 960:] = True  # the last splits' every bit, bit 31 included
    counts = keep.sum(-1, dtype=torch.int32)[..., None]
    indices = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True).to(torch.int32)[:, :, None]
    out = triton_sparse_decode(q, k, v, counts.to(device), indices.to(device), block, enable_gqa=True)
    expected = dense_oracle(q, k, v, token_allowed(counts, indices, block, kv_len).to(device))
    assert torch.equal(out[0, 2], torch.zeros_like(out[0, 2]))  # the head that keeps nothing
    assert rel_err(out, expected) < tolerance(torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.slow
def test_decode_kernel_group_sharing_one_list_and_groups_with_equal_counts(device):
    """A GQA group whose heads keep one list (split by rank in it) and a group whose heads keep as many blocks
    each but different ones (split by block id), over a cache of 1024 blocks."""
    b, h, kvh, kv_len, d, block = 1, 8, 2, 1024 * 16, 16, 16
    q, k, v = qkv(b, h, kvh, kv_len, d, torch.float32, device)
    g = torch.Generator().manual_seed(5)
    shared = torch.randperm(1024, generator=g)[:300].sort().values
    own = [torch.randperm(1024, generator=g)[:300].sort().values for _ in range(4)]
    indices = torch.stack([shared] * 4 + own).to(torch.int32)[None, :, None]
    counts = torch.full((1, h, 1), 300, dtype=torch.int32)
    out = triton_sparse_decode(q, k, v, counts.to(device), indices.to(device), block, enable_gqa=True)
    expected = dense_oracle(q, k, v, token_allowed(counts, indices, block, kv_len).to(device))
    assert rel_err(out, expected) < tolerance(torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_kernel_row_with_no_block_is_zero_and_plans_broadcast(device):
    q, k, v = qkv(2, 4, 2, 64, 16, device=device)
    counts = torch.tensor([[[2]], [[0]]], dtype=torch.int32, device=device)  # [B=2, Hp=1, 1]
    indices = torch.tensor([[[[1, 3, 0, 0]]], [[[0, 0, 0, 0]]]], dtype=torch.int32, device=device)
    out = triton_sparse_decode(q, k, v, counts, indices, 16, enable_gqa=True)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    allowed = token_allowed(counts[:1].cpu(), indices[:1].cpu(), 16, 64).to(device)
    assert rel_err(out[:1], dense_oracle(q[:1], k[:1], v[:1], allowed)) < 1e-5


def test_merge_partials_is_softmax_of_the_union():
    scores, values = torch.randn(3, 40, dtype=torch.float64), torch.randn(3, 40, 8, dtype=torch.float64)
    parts = scores.split(10, -1), values.split(10, -2)
    maxima = torch.stack([s.amax(-1) for s in parts[0]], -1) / torch.log(torch.tensor(2.0, dtype=torch.float64))
    sums = torch.stack([torch.exp(s - s.amax(-1, keepdim=True)).sum(-1) for s in parts[0]], -1)
    accs = torch.stack([(torch.exp(s - s.amax(-1, keepdim=True))[..., None] * v).sum(-2)
                        for s, v in zip(*parts)], -2)
    expected = (torch.softmax(scores, -1)[..., None] * values).sum(-2)
    assert rel_err(merge_partials(maxima, sums, accs), expected) < 1e-12


@triton.jit
def _merge_kernel(PartMax, PartSum, PartAcc, Out, rows, splits, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  ROWS: tl.constexpr, SPLIT_CHUNK: tl.constexpr):
    first = tl.program_id(0) * ROWS
    _merge_rows(PartMax, PartSum, PartAcc, Out, first, tl.minimum(rows - first, ROWS), splits, HEAD_DIM, BLOCK_D,
                ROWS, SPLIT_CHUNK)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("splits, head_dim, chunk, rows_at_once",
                         [(5, 64, 8, 8), (8, 96, 8, 4), (1, 128, 1, 2), (37, 128, 8, 4), (37, 128, 64, 8)])
def test_kernel_merge_equals_pytorch_merge(device, splits, head_dim, chunk, rows_at_once):
    """The decode kernel's merge (run by the last program of a KV head, for the group's rows at once) equals
    merge_partials, with empty splits (max -inf, sum 0), a row with none and one whose first chunk is empty,
    reading the splits in one chunk or several, the last group of rows cut short."""
    rows, block_d = 6, 128
    maxima = torch.randn(rows, splits, device=device) * 4
    sums = torch.rand(rows, splits, device=device) + 0.5
    accs = torch.randn(rows, splits, block_d, device=device)
    maxima[1, 0], sums[1, 0], accs[1, 0] = float("-inf"), 0.0, 0.0
    maxima[4], sums[4], accs[4] = float("-inf"), 0.0, 0.0
    maxima[5, :chunk], sums[5, :chunk], accs[5, :chunk] = float("-inf"), 0.0, 0.0
    maxima[5, -1], sums[5, -1], accs[5, -1] = 1.0, 1.0, 1.0  # ... but not its last split
    out = torch.full((rows, head_dim), float("nan"), dtype=torch.bfloat16, device=device)
    _merge_kernel[(-(-rows // rows_at_once),)](maxima, sums, accs, out, rows, splits, HEAD_DIM=head_dim,
                                               BLOCK_D=block_d, ROWS=rows_at_once, SPLIT_CHUNK=chunk)
    expected = merge_partials(maxima.double(), sums.double(), accs[..., :head_dim].double())
    assert torch.equal(out[4].float(), torch.zeros(head_dim, device=device))
    assert rel_err(out.float(), expected.float()) < tolerance(torch.bfloat16)
