"""Block attention-mass estimates (``block_estimates``) against float64 definitions written here: every estimate's
rows sum to 1 over their visible key blocks; the pooled estimate, the exact mass of chosen queries, the sampled
estimate with its exact last rows and their needed blocks, the vertical-slash extension, the Jensen-Shannon test
the adaptive estimate chooses by, and a context-parallel shard's rows."""

import math

import pytest
import torch

from dam_compile.dynamic.block_estimates import (
    EXACT_ROW_MASS,
    QUERY_AWARE_JS_DISTANCE,
    adaptive_estimate,
    block_sizes,
    block_sums,
    blocks_each_row_needs,
    js_divergence,
    last_block_estimate,
    last_rows_block_mass,
    last_rows_mass,
    pooled_block_estimate,
    pooled_estimate,
    sampled_estimate,
    sampled_per_block,
    sampled_shard_estimate,
    vertical_slash,
)
from dam_compile.dynamic.estimators import ESTIMATOR_SPECS
from dam_compile.kernels.last_rows_lse import exact_query_rows

from dam_testing import rel_err

D, BLOCK = 32, 32
ESTIMATES = [pooled_block_estimate, last_block_estimate, adaptive_estimate, sampled_estimate]


def qk(heads, kv_heads, q_len, kv_len, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(1, heads, q_len, d, generator=g), 2 * torch.randn(1, kv_heads, kv_len, d, generator=g)


def exact_mass(q, k, positions, block, causal):
    """float64 ``[B, H, len(positions), Nk]``: each listed query's softmax attention summed per key block (query
    row ``i`` sees keys ``<= i`` when causal), grouped K heads repeated."""
    q64, k64 = q[:, :, positions].double(), k.double().repeat_interleave(q.shape[1] // k.shape[1], 1)
    scores = q64 @ k64.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        scores = scores.masked_fill(torch.arange(k.shape[-2])[None, :] > positions[:, None], -math.inf)
    probs = scores.softmax(-1)
    nk = -(-k.shape[-2] // block)
    return torch.nn.functional.pad(probs, (0, nk * block - k.shape[-2])).unflatten(-1, (nk, block)).sum(-1)


def visible(mq, nk, causal):
    return (torch.arange(nk)[None, :] <= torch.arange(mq)[:, None]) if causal else torch.ones(mq, nk, dtype=torch.bool)


def test_block_sums_and_sizes_with_a_ragged_last_block():
    x = torch.randn(2, 3, 70, 5, dtype=torch.float64)
    sums = block_sums(x, 16)
    assert sums.dtype == torch.float32 and sums.shape == (2, 3, 5, 5)
    for m, part in enumerate(x.split(16, dim=-2)):
        assert rel_err(sums[..., m, :], part.sum(-2)) < 1e-6
    assert block_sizes(70, 5, 16, torch.device("cpu")).tolist() == [16, 16, 16, 16, 6]


def test_the_estimates_checked_here_are_the_registered_ones():
    assert {f.__name__ for f in ESTIMATES} == {spec.estimate.__name__ for spec in ESTIMATOR_SPECS.values()}


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("estimate", ESTIMATES, ids=lambda f: f.__name__)
def test_every_estimate_is_a_distribution_over_the_visible_blocks(estimate, causal):
    q, k = qk(4, 2, 200, 200)  # ragged: 13 blocks of 16, the last of 8
    result = estimate(q, k, 16, causal, 0.25)
    mass = result.mass
    assert mass.dtype == torch.float32 and mass.shape == (1, 4, 13, 13)
    seen = visible(13, 13, causal)
    assert (mass >= 0).all() and not mass[..., ~seen].any()
    assert torch.allclose(mass.sum(-1), torch.ones(1, 4, 13), atol=1e-5)
    if result.needed is not None:
        assert not result.needed[..., ~seen].any()


def test_pooled_estimate_is_the_softmax_of_mean_blocks():
    """Mean query block . mean key block, scaled, plus the log of the keys a query sees (about half of the causal
    diagonal block's), softmax over the visible blocks; grouped K heads shared."""
    q, k = qk(4, 2, 70, 70, seed=1)
    got = pooled_estimate(q, k, 16, True, 0.3)
    sizes = torch.tensor([16, 16, 16, 16, 6], dtype=torch.float64)
    q_mean = torch.stack([part.double().mean(-2) for part in q.split(16, -2)], -2)
    k_mean = torch.stack([part.double().mean(-2) for part in k.split(16, -2)], -2).repeat_interleave(2, 1)
    seen_keys = sizes.expand(5, 5).clone()
    seen_keys.diagonal().copy_((sizes + 1) / 2)
    logits = q_mean @ k_mean.transpose(-1, -2) * 0.3 + seen_keys.log()
    want = logits.masked_fill(~visible(5, 5, True), -math.inf).softmax(-1)
    assert rel_err(got, want) < 1e-5
    assert rel_err(pooled_estimate(q, k, 16, False, 0.3), (logits - seen_keys.log() + sizes.log()).softmax(-1)) < 1e-5


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("q_len, kv_len, heads, kv_heads", [(200, 200, 4, 2), (70, 300, 2, 2), (64, 64, 4, 1)])
def test_last_rows_mass_is_the_exact_block_mass_of_each_query(causal, q_len, kv_len, heads, kv_heads):
    """Per-block log-sum-exp of the last block's queries gives each query's exact attention mass per key block
    (ragged last block, grouped heads, causal rows that see part of the last block)."""
    g = torch.Generator().manual_seed(q_len + kv_len)
    q, k = 2 * torch.randn(1, heads, q_len, D, generator=g), 2 * torch.randn(1, kv_heads, kv_len, D, generator=g)
    got = last_rows_mass(q, k, BLOCK, causal, D**-0.5)
    rows = exact_query_rows(q_len, BLOCK)  # the last query block, and the one before when it is ragged
    assert rows == (BLOCK + q_len % BLOCK if q_len % BLOCK and q_len > BLOCK else min(BLOCK, q_len))
    scores = (q[:, :, -rows:].double() @ k.double().repeat_interleave(heads // kv_heads, 1).transpose(-1, -2))
    if causal:  # SDPA's is_causal: query i sees keys up to i (top-left aligned)
        pos = torch.arange(q_len - rows, q_len)[:, None]
        scores = scores.masked_fill(torch.arange(kv_len)[None] > pos, -math.inf)
    probs = torch.softmax(scores * D**-0.5, -1)
    nk = -(-kv_len // BLOCK)
    want = torch.nn.functional.pad(probs, (0, nk * BLOCK - kv_len)).unflatten(-1, (nk, BLOCK)).sum(-1)
    assert got.shape == (1, heads, rows, nk)
    assert rel_err(got, want) < 1e-5


def test_last_rows_block_mass_is_their_mean():
    q, k = qk(2, 1, 100, 100)
    rows = exact_query_rows(100, 16)
    want = exact_mass(q, k, torch.arange(100 - rows, 100), 16, True).mean(-2)
    assert rel_err(last_rows_block_mass(q, k, 16, True, 0.25), want) < 1e-5


def test_blocks_each_row_needs_by_hand():
    """The fewest blocks holding the target of each row's mass, largest first; the union over rows; a block of no
    mass never."""
    rows = torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0], [0.0, 0.0, 0.1, 0.0, 0.9]])
    assert blocks_each_row_needs(rows[:1], 0.8).tolist() == [True, True, False, False, False]
    assert blocks_each_row_needs(rows[:1], 0.81).tolist() == [True, True, True, False, False]
    assert blocks_each_row_needs(rows[:1], 1.0).tolist() == [True, True, True, True, False]
    assert blocks_each_row_needs(rows, 0.9).tolist() == [True, True, True, False, True]
    assert blocks_each_row_needs(rows[None], 0.95).shape == (1, 5)


@pytest.mark.parametrize("causal", [True, False])
def test_vertical_slash_by_hand(causal):
    """Each visible block scores its column's mass plus the mass at its block offset seen from the last row
    (offset ``d`` is key block ``Mq - 1 - d``, none past either end), normalised per row."""
    column = torch.tensor([[[0.5, 0.2, 0.1, 0.15, 0.05]]])  # the last row's mass over 5 key blocks
    got = vertical_slash(column, 4, causal)[0, 0]
    want = torch.zeros(4, 5, dtype=torch.float64)
    for m in range(4):
        for n in range(5):
            if n <= m or not causal:
                source = 3 - (m - n)
                want[m, n] = column[0, 0, n] + (column[0, 0, source] if 0 <= source < 5 else 0.0)
    want = want / want.sum(-1, keepdim=True)
    assert rel_err(got, want) < 1e-6
    if not causal:  # row 0 by hand: blocks 0 and 1 add the last row's blocks 3 and 4 (offsets 0 and -1)
        assert rel_err(got[0], torch.tensor([0.65, 0.25, 0.1, 0.15, 0.05]) / 1.2) < 1e-6


def test_js_divergence():
    p = torch.tensor([[0.7, 0.2, 0.1], [1.0, 0.0, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.1, 0.2, 0.7], [0.0, 0.0, 1.0]], dtype=torch.float64)
    mid = (p + q) / 2
    kl = lambda a: (a * torch.where(a > 0, a / mid, torch.ones_like(a)).log()).sum(-1)  # noqa: E731
    assert rel_err(js_divergence(p, q), 0.5 * (kl(p) + kl(q))) < 1e-9
    assert js_divergence(p, q)[1].item() == pytest.approx(math.log(2))  # disjoint: the most there is
    assert torch.equal(js_divergence(p, q), js_divergence(q, p)) and js_divergence(p, p).abs().max() < 1e-12


def test_adaptive_estimate_takes_pooled_or_vertical_slash_per_head_by_the_last_rows():
    """Per head: the pooled rows where the pooled last row is within the JS distance of the exact column mass,
    vertical-slash lines elsewhere; the exact last rows in both (a head of each kind among the inputs)."""
    q, k = qk(4, 2, 256, 256, seed=3)
    k[..., ::7, :] += 2 * q[:, ::2, -1:, :]  # columns the last queries attend to: vertical-slash heads
    q[:, 2:] = 0.01 * q[:, 2:]  # two nearly uniform heads, where pooling agrees
    got = adaptive_estimate(q, k, 16, True, 0.25)
    exact = exact_mass(q, k, torch.arange(240, 256), 16, True)
    column = exact.mean(-2)
    pooled = pooled_estimate(q, k, 16, True, 0.25).double()
    query_aware = js_divergence(pooled[..., -1, :], column).sqrt() < QUERY_AWARE_JS_DISTANCE
    assert query_aware.flatten().tolist() == [False, False, True, True]
    for h, aware in enumerate(query_aware[0].tolist()):
        want = pooled[0, h, :-1] if aware else vertical_slash(column, 16, True)[0, h, :-1]
        assert rel_err(got.mass[0, h, :-1], want) < 1e-4, h
    assert rel_err(got.mass[..., -1, :], column) < 1e-5
    assert got.exact.tolist() == [False] * 15 + [True]


@pytest.mark.parametrize("q_len", [256, 250])
def test_sampled_estimate_rows_and_exact_last_rows(q_len):
    """Every row the mean exact mass of every 8th of its queries (the last of each eighth of the block); the last
    query block exact (and the block before it too when the last is ragged), needing the blocks that hold
    ``EXACT_ROW_MASS`` of each of its queries' attention."""
    block, per_block = 32, sampled_per_block(32)
    assert per_block == 4 and sampled_per_block(4) == 1
    q, k = qk(2, 1, q_len, q_len, seed=q_len)
    got = sampled_estimate(q, k, block, True, 0.25)
    mq = -(-q_len // block)
    exact_blocks = 2 if q_len % block else 1
    for m in range(mq - exact_blocks):
        positions = torch.arange(1, per_block + 1) * (block // per_block) - 1 + m * block
        assert rel_err(got.mass[..., m, :], exact_mass(q, k, positions, block, True).mean(-2)) < 1e-5, m
    assert got.exact.tolist() == [m >= mq - exact_blocks for m in range(mq)]
    for m in range(mq - exact_blocks, mq):
        positions = torch.arange(m * block, min(q_len, (m + 1) * block))
        rows = exact_mass(q, k, positions, block, True)
        assert rel_err(got.mass[..., m, :], rows.mean(-2)) < 1e-5
        kept = (rows * got.needed[..., m, None, :]).sum(-1)
        assert (kept >= EXACT_ROW_MASS - 1e-6).all()  # each query's own target
        fewer = got.needed[..., m, :].clone()
        fewer[..., rows.mean(-2).masked_fill(~fewer, 2.0).argmin(-1)] = False  # drop the lightest needed block
        assert ((rows * fewer[..., None, :]).sum(-1) < EXACT_ROW_MASS).any()  # and some query falls short
    assert not got.needed[..., : mq - exact_blocks, :].any()


def test_a_shard_estimates_the_rows_of_the_whole_sequence():
    """A context-parallel rank's query blocks (head-tail order), against all keys: the whole sequence's sampled
    rows at their places, the sequence's last block exact on the rank that holds it."""
    q, k = qk(2, 1, 256, 256, seed=4)
    whole = sampled_estimate(q, k, 32, True, 0.25)
    for blocks in (torch.tensor([0, 7]), torch.tensor([2, 5]), torch.tensor([6, 1])):
        rows = torch.cat([q[:, :, b * 32:(b + 1) * 32] for b in blocks.tolist()], dim=2)
        shard = sampled_shard_estimate(rows, k, 32, 0.25, blocks, 256)
        assert rel_err(shard.mass, whole.mass[..., blocks, :]) < 1e-5
        assert torch.equal(shard.exact, whole.exact[blocks])
        assert torch.equal(shard.needed, whole.needed[..., blocks, :])

