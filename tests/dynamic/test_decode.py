"""Sparse decode: the one-row plan (every source) and the split-KV Triton kernel, against float64 oracles."""

import pytest
import torch
import triton
import triton.language as tl

from dam_compile.plan.block_plan import BlockSparsePlan, PATTERN_PAD
from dam_compile.dynamic.block_estimates import EXACT_ROW_MASS
from dam_compile.plan.dam_patterns import HeadPatterns, extended_mask
from dam_compile.kernels.decode_kernel import _merge_rows, merge_partials, triton_sparse_decode
from dam_compile.dynamic.decode_plan import decode_block_plan
from dam_compile.plan.reference import block_sparse_attention_reference

from dam_testing import dense_oracle, rel_err, tolerance

from dam_compile.kernels.block_sparse_launch import interpreting

DEVICES = (["cpu"] if interpreting() else []) + (["cuda"] if torch.cuda.is_available() else [])


def qkv(b, h, kvh, kv_len, d, dtype=torch.float32, device="cpu"):
    g = torch.Generator(device="cpu").manual_seed(kv_len * 7 + h)
    make = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return make(b, h, 1, d), make(b, kvh, kv_len, d), make(b, kvh, kv_len, d)


def token_allowed(counts, indices, block, kv_len):
    """[B, H, 1, Lk] bool: keys inside the listed blocks."""
    plan = BlockSparsePlan(counts, indices, block)
    partial, _ = plan.block_tables(kv_len)
    return partial.repeat_interleave(block, dim=-1)[..., :kv_len]


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


def kept(counts, indices):
    """Kept block ids per [b][h] as Python sets."""
    return [[set(indices[b, h, 0, : counts[b, h, 0]].tolist()) for h in range(counts.shape[1])]
            for b in range(counts.shape[0])]


def test_dense_and_streaming_decode_plans():
    q, k, _ = qkv(1, 2, 1, 150, 8)
    dense = kept(*decode_block_plan(q, k, source="dense", block_size=16))
    assert dense == [[set(range(10))] * 2]
    streaming = kept(*decode_block_plan(q, k, source="streaming", block_size=16, sink_blocks=1, local_blocks=3))
    assert streaming == [[{0, 7, 8, 9}] * 2]


def test_decode_plan_follows_the_row_in_a_static_cache_with_left_padding():
    """The mask says where the row is: local blocks end at its last visible key, the sink starts at its first."""
    q, k, _ = qkv(2, 2, 1, 160, 8)
    mask = torch.zeros(2, 1, 1, 160, dtype=torch.bool)
    mask[0, ..., :70] = True  # static cache: 70 tokens written
    mask[1, ..., 35:101] = True  # left-padded to 35, 101 written
    plans = kept(*decode_block_plan(q, k, mask, source="streaming", block_size=16, sink_blocks=1, local_blocks=2))
    assert plans[0] == [{0, 3, 4}] * 2
    assert plans[1] == [{2, 5, 6}] * 2
    dense = kept(*decode_block_plan(q, k, mask, source="dense", block_size=16))
    assert dense[0] == [set(range(5))] * 2 and dense[1] == [set(range(2, 7))] * 2


def test_dynamic_decode_plan_finds_the_heavy_block_within_budget():
    """A row whose mass sits in one block keeps that block, the sink and the window, and no more than the
    density budget."""
    torch.manual_seed(0)
    b, h, kvh, kv_len, d, block = 1, 4, 2, 64 * 16, 32, 16
    q, k, _ = qkv(b, h, kvh, kv_len, d)
    hot = [11, 40, 23, 5]  # one block per query head whose keys align with that head's query
    for head, blk in enumerate(hot):
        k[0, head // 2, blk * block: (blk + 1) * block] += 40 * q[0, head, 0] / q[0, head, 0].norm()
    counts, indices = decode_block_plan(q, k, source="dynamic", block_size=block, density=0.05, sink_blocks=1,
                                        local_blocks=2)
    plans = kept(counts, indices)[0]
    for head, blk in enumerate(hot):
        assert {0, 62, 63, blk} <= plans[head]
    assert counts.max() <= 3 + -(-64 * 5 // 100)


@pytest.mark.parametrize("spread", [0.3, 1.0, 3.0])
def test_dynamic_decode_plan_keeps_the_exact_row_mass_of_a_diffuse_row(spread):
    """Beyond the density budget, a row whose attention is spread keeps the blocks holding ``EXACT_ROW_MASS``
    of it (the prefill's last query block keeps the same), and only those: the budget follows the mass."""
    b, h, kvh, kv_len, d, block = 1, 4, 2, 64 * 16, 32, 16
    q, k, _ = qkv(b, h, kvh, kv_len, d)
    q = spread * q
    counts, indices = decode_block_plan(q, k, source="dynamic", block_size=block, density=0.05, sink_blocks=1,
                                        local_blocks=2)
    allowed = token_allowed(counts, indices, block, kv_len)
    probs = torch.softmax((q @ k.repeat_interleave(2, 1).transpose(-1, -2)).double() / d**0.5, dim=-1)
    kept_mass = (probs * allowed).sum(-1).flatten()
    assert (kept_mass >= EXACT_ROW_MASS).all(), kept_mass
    # No more than sink, window, the density budget and the fewest blocks that reach the target.
    ordered = probs.view(b, h, 64, block).sum(-1)[0].sort(-1, descending=True).values
    fewest = (ordered.cumsum(-1) < EXACT_ROW_MASS).sum(-1) + 1
    assert (counts.flatten() <= 3 + 4 + fewest).all(), (counts.flatten(), fewest)


def test_dynamic_decode_plan_keeps_a_one_token_needle_and_ignores_keys_past_the_row():
    """One key per head matches the row (a needle a few sampled keys per block would miss); a stronger match
    past the row's last written key (a static cache) must not count."""
    torch.manual_seed(1)
    b, h, kvh, kv_len, d, block = 1, 2, 1, 64 * 16, 32, 16
    q, k, _ = qkv(b, h, kvh, kv_len, d)
    needles = [16 * 20 + 5, 16 * 33 + 11]
    for head, pos in enumerate(needles):
        k[0, 0, pos] = 12 * q[0, head, 0] / q[0, head, 0].norm()
    mask = torch.zeros(1, 1, 1, kv_len, dtype=torch.bool)
    mask[..., :800] = True  # 800 keys written
    k[0, 0, 900] = 30 * q[0, 0, 0] / q[0, 0, 0].norm()
    counts, indices = decode_block_plan(q, k, mask, source="dynamic", block_size=block, density=0.02,
                                        sink_blocks=1, local_blocks=1)
    plans = kept(counts, indices)[0]
    for head, pos in enumerate(needles):
        assert pos // block in plans[head]
        assert max(plans[head]) <= 799 // block


def test_calibrated_decode_plan_covers_the_extended_mask_row():
    heads, pcl, kv_len, block = 3, 8, 100, 16
    diagonals = torch.tensor([[0, 1, 20], [0, PATTERN_PAD, PATTERN_PAD], [0, 50, PATTERN_PAD]], dtype=torch.int32)
    columns = torch.tensor([[0, 3], [PATTERN_PAD, PATTERN_PAD], [35, PATTERN_PAD]], dtype=torch.int32)
    corner = torch.tril(torch.ones(heads, pcl, pcl, dtype=torch.bool))
    q, k, _ = qkv(1, heads, heads, kv_len, 8)
    counts, indices = decode_block_plan(q, k, None, diagonals, columns, source="calibrated", block_size=block,
                                        corner_len=pcl)
    row = extended_mask(HeadPatterns(diagonals, columns, corner), 1, kv_len, True, q_offset=kv_len - 1)[:, 0]
    expected = [set((row[h].nonzero()[:, 0] // block).tolist()) for h in range(heads)]
    assert kept(counts, indices)[0] == expected
