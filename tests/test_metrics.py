"""Fidelity measures (metrics.py) against float64 computations written here from the definitions, on fresh random
inputs: the attention-mass recall of a plan (causal or not, grouped heads, a query offset, an SDPA mask, chunked
rows), the top-mass oracle plan and the output error."""

import pytest
import torch

from dam_compile.metrics import attention_mass_recall, output_error, top_mass_plan
from dam_compile.plan.block_plan import PATTERN_PAD, BlockSparsePlan
from dam_compile.plan.dam_patterns import HeadPatterns
from dam_compile.plan.pattern_plan import pattern_plan

BLOCK = 16


def random_plan(batch, heads, q_len, kv_len, seed, keep=0.5) -> tuple[BlockSparsePlan, torch.Tensor]:
    """A plan of random kept blocks (all partial) and its block table ``[B, H, Mq, Nk]``."""
    g = torch.Generator().manual_seed(seed)
    mq, nk = -(-q_len // BLOCK), -(-kv_len // BLOCK)
    table = torch.rand(batch, heads, mq, nk, generator=g) < keep
    return BlockSparsePlan.from_block_tables(table, BLOCK), table


def allowed_tokens(table, q_len, kv_len, is_causal, q_offset=0) -> torch.Tensor:
    """bool ``[B, H, Lq, Lk]``: the key's block is kept for the query's block, and (causal) the key is not after
    the query's position ``i + q_offset``."""
    i, j = torch.arange(q_len), torch.arange(kv_len)
    tokens = table[:, :, i // BLOCK][:, :, :, j // BLOCK]
    if is_causal:
        tokens = tokens & (j[None, :] <= i[:, None] + q_offset)
    return tokens


def probs64(q, k, scale, is_causal, q_offset=0, mask=None) -> torch.Tensor:
    """Exact softmax attention weights in float64 (K heads repeated for their query heads); rows that see no key
    are zero."""
    q, k = q.double(), k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = q @ k.transpose(-1, -2) * scale
    i, j = torch.arange(q.shape[-2]), torch.arange(k.shape[-2])
    if is_causal:
        scores = scores.masked_fill(j[None, :] > i[:, None] + q_offset, float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.double()
    return scores.softmax(-1).nan_to_num(0.0)


def recall_by_hand(probs, allowed) -> torch.Tensor:
    """Mean over the rows that see any key of the mass on allowed keys: float64 ``[B, H]``."""
    kept = (probs * allowed).sum(-1)
    seen = probs.sum(-1) > 0
    return (kept * seen).sum(-1) / seen.sum(-1).clamp_min(1)


@pytest.mark.parametrize(
    "heads, kv_heads, q_len, kv_len, is_causal, q_offset",
    [(4, 2, 80, 80, True, 0), (2, 2, 72, 72, False, 0), (4, 1, 40, 88, True, 48), (2, 2, 50, 50, True, 0)],
    ids=["grouped causal", "non-causal", "query offset", "ragged blocks"],
)
def test_mass_recall_is_the_exact_mass_on_kept_keys(heads, kv_heads, q_len, kv_len, is_causal, q_offset):
    g = torch.Generator().manual_seed(q_len + kv_len)
    q, k = torch.randn(2, heads, q_len, 8, generator=g), torch.randn(2, kv_heads, kv_len, 8, generator=g)
    plan, table = random_plan(2, heads, q_len, kv_len, seed=q_len)
    scale = 0.7
    expected = recall_by_hand(probs64(q, k, scale, is_causal, q_offset),
                              allowed_tokens(table, q_len, kv_len, is_causal, q_offset))
    for chunk in (1 << 24, 2 * heads * kv_len * BLOCK):  # one chunk, and one block of rows at a time
        recall = attention_mass_recall(q, k, plan, is_causal=is_causal, scale=scale, enable_gqa=heads != kv_heads,
                                       q_offset=q_offset, max_chunk_elements=chunk)
        assert recall.dtype == torch.float64 and recall.shape == (2, heads)
        assert torch.allclose(recall, expected, rtol=1e-5, atol=1e-7), (recall, expected)
    assert 0.05 < float(expected.mean()) < 0.95  # the random plan keeps some mass and drops some


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_mass_recall_applies_the_attentions_own_mask_and_skips_rows_that_see_nothing(kind):
    g = torch.Generator().manual_seed(7)
    n = 64
    q, k = torch.randn(2, 2, n, 8, generator=g), torch.randn(2, 2, n, 8, generator=g)
    plan, table = random_plan(2, 2, n, n, seed=3)
    attend = torch.rand(2, 1, n, n, generator=g) < 0.7
    attend[0, :, :5] = False  # batch 0's first five rows see nothing: not counted
    if kind == "bool":
        mask = exact = attend
    else:  # HF's float mask: the dtype's minimum where masked, other biases elsewhere
        bias = torch.randn(2, 1, n, n, generator=g)
        mask = bias.masked_fill(~attend, torch.finfo(torch.float32).min)
        exact = bias.double().masked_fill(~attend, float("-inf"))
    expected = recall_by_hand(probs64(q, k, 8 ** -0.5, False, mask=exact), allowed_tokens(table, n, n, False))
    recall = attention_mass_recall(q, k, plan, is_causal=False, attn_mask=mask)
    assert torch.allclose(recall, expected, rtol=1e-5, atol=1e-7)


def test_recall_ignores_padding_rows():
    """A held-out row of padding (its mask lets it see nothing) does not count: with 8 left-padded positions the
    recall is that of the 32 real rows alone."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 40, 8, generator=g), torch.randn(1, 2, 40, 8, generator=g)
    patterns = HeadPatterns(torch.zeros(2, 1, dtype=torch.int32), torch.full((2, 1), PATTERN_PAD, dtype=torch.int32),
                            torch.eye(8, dtype=torch.bool).expand(2, 8, 8))  # diagonal 0 only
    alone = attention_mass_recall(q[:, :, 8:], k[:, :, 8:], diagonal_plan(patterns, 32), is_causal=True)
    valid = torch.arange(40) >= 8
    mask = torch.ones(40, 40, dtype=torch.bool).tril() & valid[None, :]
    padded = attention_mass_recall(q, k, diagonal_plan(patterns, 40), is_causal=False, attn_mask=mask)
    assert torch.allclose(padded, alone, atol=1e-6)
    additive = torch.zeros(40, 40).masked_fill(~mask, torch.finfo(torch.float32).min)  # HF's float mask
    assert torch.allclose(attention_mass_recall(q, k, diagonal_plan(patterns, 40), is_causal=False,
                                                attn_mask=additive), alone, atol=1e-6)


def diagonal_plan(patterns, n):
    return pattern_plan(patterns.diagonals, patterns.columns, patterns.corner, n, n, 16, True)


def test_mass_recall_rejects_grouped_heads_without_enable_gqa_and_a_plan_of_another_shape():
    q, k = torch.randn(1, 4, 32, 8), torch.randn(1, 2, 32, 8)
    plan, _ = random_plan(1, 4, 32, 32, seed=0)
    with pytest.raises(ValueError, match="enable_gqa"):
        attention_mass_recall(q, k, plan, is_causal=True)
    with pytest.raises(ValueError):
        attention_mass_recall(q, k, random_plan(1, 4, 64, 64, seed=0)[0], is_causal=True, enable_gqa=True)


def test_top_mass_plan_keeps_the_budget_of_blocks_with_the_most_exact_mass():
    """Per query-block row, the ``budget`` causal-visible key blocks of largest float64 mass; those below the
    diagonal are full, the diagonal one partial (88 tokens: a ragged last block)."""
    n = 88
    nb = -(-n // BLOCK)
    g = torch.Generator().manual_seed(11)
    q, k = torch.randn(1, 4, n, 8, generator=g), torch.randn(1, 2, n, 8, generator=g)
    budget = torch.randint(1, nb + 2, (1, 4, nb), generator=g)  # some budgets larger than the row
    plan = top_mass_plan(q, k, BLOCK, budget)

    probs = torch.nn.functional.pad(probs64(q, k, 8 ** -0.5, True), (0, nb * BLOCK - n, 0, nb * BLOCK - n))
    mass = probs.unflatten(-1, (nb, BLOCK)).sum(-1).unflatten(-2, (nb, BLOCK)).sum(-2)  # [1, 4, Mq, Nk]
    visible = torch.ones(nb, nb, dtype=torch.bool).tril()
    expected = torch.zeros(1, 4, nb, nb, dtype=torch.bool)
    for h in range(4):
        for row in range(nb):
            ranked = mass[0, h, row].masked_fill(~visible[row], -1.0).argsort(descending=True)
            keep = ranked[: min(int(budget[0, h, row]), row + 1)]
            expected[0, h, row, keep] = True
    partial, full = plan.block_tables(n)
    assert torch.equal(partial | full, expected)
    assert not (partial & full).any()
    below = torch.ones(nb, nb, dtype=torch.bool).tril(-1)
    assert torch.equal(full, expected & below) and torch.equal(partial, expected & ~below)
    assert (expected.sum(-1) < visible.sum(-1)).any()  # some rows really drop blocks


def test_output_error_is_the_relative_frobenius_error_in_float64():
    g = torch.Generator().manual_seed(5)
    reference = torch.randn(2, 3, 17, generator=g)
    output = reference + 1e-3 * torch.randn(2, 3, 17, generator=g)
    expected = float((output.double() - reference.double()).norm() / reference.double().norm())
    assert output_error(output, reference) == pytest.approx(expected, rel=1e-12)
    half = output.to(torch.bfloat16)
    assert output_error(half, reference) == pytest.approx(
        float((half.double() - reference.double()).norm() / reference.double().norm()), rel=1e-12)
    assert output_error(reference, reference) == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        output_error(output, reference[0])
