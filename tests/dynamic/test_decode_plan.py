"""The kept key blocks of a decode step (``decode_block_plan``, every source) against their definitions; the
kernel that runs them is ``kernels/test_decode_kernel.py``'s."""

import pytest
import torch

from dam_compile.plan.block_plan import PATTERN_PAD
from dam_compile.dynamic.block_estimates import EXACT_ROW_MASS
from dam_compile.plan.dam_patterns import HeadPatterns, extended_mask
from dam_compile.dynamic.decode_plan import decode_block_plan

from decode_inputs import qkv, token_allowed


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
