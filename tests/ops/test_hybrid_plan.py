"""The hybrid plan (calibrated heads + dynamic retrieval heads): per head, exactly the dynamic plan or the pattern
plan, token for token, and the decode plan's dynamic heads."""

import pytest
import torch

from dam_compile.config import DAMConfig
from dam_compile.plan.block_plan import BlockSparsePlan
from dam_compile.plan.reference import token_mask
from dam_compile.plan.dam_patterns import extended_mask, match_patterns, true_mask
from dam_compile.dynamic.decode_plan import decode_block_plan
from dam_compile.dynamic.dynamic_plan import dynamic_block_plan
from dam_compile.ops.hybrid_plan import hybrid_token_pattern, merge_plans

PCL = 24


def random_patterns(heads: int, seed: int = 0):
    """Patterns from a random causal mean-attention map (a mix of diagonals, columns and a corner)."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.rand(heads, PCL, PCL, generator=g).pow(6).tril()
    mean = mean / mean.sum(-1, keepdim=True)
    return match_patterns(true_mask(mean, 0.5, 0.3), 0.5)


def qk(b, h, kvh, n, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, n, d, generator=g), torch.randn(b, kvh, n, d, generator=g)


def options(block, **kw):
    return DAMConfig(block_size=block, min_seq_len=0, kernel="reference", density=0.3, **kw).mask_options()


@pytest.mark.parametrize(
    "b, h, kvh, n, block, dynamic",
    [(1, 4, 2, 100, 16, [1]), (2, 4, 4, 64, 16, [0, 3]), (1, 8, 2, 130, 32, [2, 5, 7]), (2, 2, 1, 37, 16, [0])],
)
@pytest.mark.parametrize("estimator", ["pooled", "last_block"])
def test_hybrid_plan_is_the_dynamic_plan_on_dynamic_heads_and_the_pattern_plan_elsewhere(
    b, h, kvh, n, block, dynamic, estimator
):
    q, k = qk(b, h, kvh, n)
    patterns = random_patterns(h)
    chosen = torch.zeros(h, dtype=torch.bool)
    chosen[dynamic] = True
    opts = options(block, estimator=estimator)
    token = hybrid_token_pattern(patterns, chosen, block)
    lists = torch.ops.dam.hybrid_plan(q, k, token.diagonals, token.columns, token.corner, chosen,
                                      **opts.dynamic_plan_kwargs(True, None))
    plan = BlockSparsePlan(*lists[:2], block, *lists[2:], token.diagonals, token.columns, token.corner)
    plan.validate(batch=b, heads=h, q_len=n, kv_len=n)
    allowed = token_mask(plan, n, n, True).expand(b, h, n, n)

    dyn = dynamic_block_plan(q, k, block_size=block, is_causal=True, tau=opts.tau, box_cox_lambda=opts.box_cox_lambda,
                             mu=opts.mu, density=opts.density, mass_target=opts.mass_target,
                             sink_blocks=opts.sink_blocks, local_blocks=opts.local_blocks, estimator=estimator)
    dyn_plan = BlockSparsePlan(*dyn[:2], block, *dyn[2:])
    dyn_allowed = token_mask(dyn_plan, n, n, True)
    dyn_tables = dyn_plan.block_tables(n)
    hyb_tables = plan.block_tables(n)
    for head in range(h):
        if chosen[head]:
            assert torch.equal(allowed[:, head], dyn_allowed[:, head]), head
            for mine, theirs in zip(hyb_tables, dyn_tables):
                assert torch.equal(mine[:, head].expand_as(theirs[:, head]), theirs[:, head])
        else:
            expected = extended_mask(patterns, n, n, True)[head]
            assert torch.equal(allowed[:, head], expected.expand(b, n, n)), head


def test_pass_through_pattern_lets_every_causal_key_of_a_diagonal_block_through():
    """The dynamic plan's partial blocks are the causal-diagonal ones: a dynamic head's token pattern must cut
    nothing there, in the PCL corner or beyond it; a pattern head's still applies."""
    patterns, block, n = random_patterns(3), 16, 80
    token = hybrid_token_pattern(patterns, torch.tensor([False, True, False]), block)
    mq = n // block
    diagonal = torch.eye(mq, dtype=torch.bool)[None, None]
    plan = BlockSparsePlan.from_block_tables(diagonal, block).with_token_pattern(token.diagonals, token.columns,
                                                                                 token.corner)
    allowed = token_mask(plan, n, n, True)[0]
    same_block = (torch.arange(n)[:, None] // block) == (torch.arange(n)[None, :] // block)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    assert torch.equal(allowed[1], causal & same_block)
    assert torch.equal(allowed[0], extended_mask(patterns, n, n, True)[0] & same_block)


def test_merge_pads_the_narrower_lists_and_broadcasts_the_pattern_batch():
    pattern = (torch.full((1, 2, 3), 5, dtype=torch.int32), torch.full((1, 2, 3, 6), 7, dtype=torch.int32))
    dynamic = (torch.full((2, 2, 3), 1, dtype=torch.int32), torch.full((2, 2, 3, 4), 2, dtype=torch.int32))
    counts, indices = merge_plans(pattern * 2, dynamic * 2, torch.tensor([True, False]))[:2]
    assert counts.shape == (2, 2, 3) and indices.shape == (2, 2, 3, 6)
    assert (counts[:, 0] == 1).all() and (counts[:, 1] == 5).all()
    assert (indices[:, 0, :, :4] == 2).all() and (indices[:, 0, :, 4:] == 0).all() and (indices[:, 1] == 7).all()


def test_hybrid_token_pattern_rejects_a_wrong_head_count():
    with pytest.raises(ValueError, match="dynamic_heads"):
        hybrid_token_pattern(random_patterns(4), torch.tensor([True, False]), 16)


def test_opcheck_hybrid_plan():
    q, k = qk(2, 4, 2, 70)
    token = hybrid_token_pattern(random_patterns(4), torch.tensor([False, True, False, True]), 16)
    args = (q, k, token.diagonals, token.columns, token.corner, torch.tensor([False, True, False, True]),
            16, True, 0, "reference", None, 0.3, 0.5, 0.8, 0.3, 0.95, 1, 2, "pooled")
    torch.library.opcheck(torch.ops.dam.hybrid_plan.default, args)


def test_hybrid_plan_keeps_nothing_when_the_attention_runs_dense():
    q, k = qk(1, 4, 2, 64)
    token = hybrid_token_pattern(random_patterns(4), torch.tensor([True, False, False, False]), 16)
    kwargs = {**options(16).dynamic_plan_kwargs(True, None), "min_seq_len": 128}
    counts, _, full_counts, _ = torch.ops.dam.hybrid_plan(q, k, token.diagonals, token.columns, token.corner,
                                                          torch.tensor([True, False, False, False]), **kwargs)
    assert counts.sum() == 0 and full_counts.sum() == 0


def test_decode_plan_runs_dynamic_heads_as_the_dynamic_source():
    b, h, kvh, n, block = 2, 4, 2, 300, 16
    q, k = qk(b, h, kvh, n, seed=3)
    q = q[:, :, -1:]
    patterns = random_patterns(h)
    chosen = torch.tensor([True, False, False, True])
    common = dict(block_size=block, density=0.2, sink_blocks=1, local_blocks=2)
    hybrid = decode_block_plan(q, k, None, patterns.diagonals, patterns.columns, source="calibrated",
                               corner_len=PCL, dynamic_heads=chosen, **common)
    dynamic = decode_block_plan(q, k, source="dynamic", **common)
    calibrated = decode_block_plan(q, k, None, patterns.diagonals, patterns.columns, source="calibrated",
                                   corner_len=PCL, **common)
    for got, want in zip(hybrid, dynamic):
        assert torch.equal(got[:, chosen], want[:, chosen])
    for got, want in zip(hybrid, calibrated):
        assert torch.equal(got[:, ~chosen], want[:, ~chosen])
