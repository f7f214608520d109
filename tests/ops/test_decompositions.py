"""The ``dam::`` ops' decompositions into ATen (``decompositions``): the attention op as masked SDPA computes what
the op computes (every plan feature, masks, GQA, a row keeping nothing, the dense path, a described key padding),
each plan op as the code it runs; and an exported graph decomposes into ATen alone and computes the same."""

import pytest
import torch

from dam_compile.kernels.last_rows_lse import last_rows_block_lse, sampled_rows_block_lse
from dam_compile.ops import attention as ops
from dam_compile.ops.decompositions import decomposition_table, sparse_attention_as_masked_sdpa
from dam_compile.ops.key_padding import HOLES, RANGES, key_padding_op, key_ranges
from dam_compile.plan.block_plan import BlockSparsePlan
from dam_compile.plan.dam_patterns import match_patterns, true_mask
from dam_compile.plan.pattern_plan import pattern_plan
from dam_compile.plan.reference import token_mask
from dam_compile.plan.structured_plans import dense_plan, streaming_plan

from dam_testing import dense_oracle, rel_err

BLOCK = 16


def qkv(b=2, h=4, kvh=2, n=72, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, heads, n, d, generator=g) for heads in (h, kvh, kvh))


def random_table(n, causal, seed):
    g = torch.Generator().manual_seed(seed)
    visible, full = dense_plan(n, n, BLOCK, causal).block_tables(n)
    keep = (torch.rand(2, 4, *visible.shape[2:], generator=g) < 0.6) & (visible | full)
    keep[0, 1, 2] = False  # a query block of one head that keeps nothing
    split = torch.rand(keep.shape, generator=g) < 0.5
    return BlockSparsePlan.from_block_tables(keep & ~(full & split), BLOCK, keep & full & split)


def calibrated(n):
    g = torch.Generator().manual_seed(3)
    patterns = match_patterns(true_mask((torch.rand(4, 24, 24, generator=g) ** 4).tril(), 0.5, 0.3), 0.5)
    return pattern_plan(patterns.diagonals, patterns.columns, patterns.corner, n, n, BLOCK, True)


def op_args(q, k, v, plan, *, mask=None, scale=None, causal=True, min_seq_len=0, kernel="reference"):
    return (q, k, v, *plan.as_op_args(), mask, scale, causal, True, BLOCK, min_seq_len, kernel)


CASES = {
    "streaming, causal": lambda n: (streaming_plan(n, n, BLOCK, True, 1, 2), dict()),
    "random lists, bool mask": lambda n: (random_table(n, False, 1), dict(
        causal=False, mask=torch.rand(2, 1, n, n, generator=torch.Generator().manual_seed(2)) < 0.8)),
    "random lists, float mask, scale": lambda n: (random_table(n, True, 4), dict(
        mask=torch.randn(1, 4, n, n, generator=torch.Generator().manual_seed(5)), scale=0.3)),
    "token pattern and corner": lambda n: (calibrated(n), dict()),
    "dense path (short)": lambda n: (streaming_plan(n, n, BLOCK, True, 1, 1), dict(min_seq_len=n + 1)),
    "dense path (CPU, auto)": lambda n: (streaming_plan(n, n, BLOCK, True, 1, 1), dict(kernel="auto")),
}


@pytest.mark.filterwarnings("ignore:dam.* runs dense")  # the CPU's kernel="auto": dense, as asked
@pytest.mark.parametrize("case", list(CASES))
def test_masked_sdpa_computes_what_the_op_computes(case):
    q, k, v = qkv(seed=len(case))
    plan, options = CASES[case](72)
    args = op_args(q, k, v, plan, **options)
    got = sparse_attention_as_masked_sdpa(*args)
    want = torch.ops.dam.sparse_attention(*args)
    assert got.shape == want.shape and got.is_contiguous()
    assert rel_err(got, want) < 1e-5
    dense = options.get("min_seq_len", 0) > 72 or options.get("kernel") == "auto"
    allowed = torch.ones(72, 72, dtype=torch.bool).tril() if dense else token_mask(plan, 72, 72, True)
    if not options.get("causal", True):
        allowed = token_mask(plan, 72, 72, False)
    assert rel_err(got, dense_oracle(q, k, v, allowed, options.get("mask"), options.get("scale"))) < 1e-5
    if case.startswith("random"):
        assert got[0, 1, 32:48].abs().max() == 0  # the row that keeps nothing: zeros, as the op returns


def test_a_described_key_padding_is_read_from_its_row():
    """The pass hands the op the key row and ``dam::key_padding``'s description; the decomposition reads the row
    whatever the kind (no host read), and computes what the op computes with the description."""
    q, k, v = qkv(seed=7)
    keep = torch.ones(2, 72, dtype=torch.bool)
    keep[1, :20] = False  # left padding: one run of valid keys
    row = keep[:, None, None, :]
    kv_range, kind = key_padding_op(row)
    assert kind.item() == RANGES
    plan = streaming_plan(72, 72, BLOCK, True, 1, 2)
    args = (*op_args(q, k, v, plan, mask=row), kv_range, 0, kind)
    assert rel_err(sparse_attention_as_masked_sdpa(*args), torch.ops.dam.sparse_attention(*args)) < 1e-5


def test_arguments_the_pass_never_writes_are_refused():
    q, k, v = qkv()
    args = op_args(q, k, v, streaming_plan(72, 72, BLOCK, True, 1, 2))
    with pytest.raises(ValueError, match="kv_range and q_offset"):
        sparse_attention_as_masked_sdpa(*args, key_ranges(torch.ones(2, 72, dtype=torch.bool))[0])
    with pytest.raises(ValueError, match="kv_range and q_offset"):
        sparse_attention_as_masked_sdpa(*args, None, 8)


def test_the_table_covers_the_ops_a_rewritten_graph_holds():
    table = decomposition_table()
    for op in (ops.dense_plan_op, ops.streaming_plan_op, ops.pattern_plan_op, ops.dynamic_plan_op, ops.decode_plan_op):
        assert table[op.opoverload] is op.fn  # the plan ops' own code, traced
    assert table[torch.ops.dam.sparse_attention.default] is sparse_attention_as_masked_sdpa
    row = torch.ones(2, 1, 1, 40, dtype=torch.bool)
    row[0, ..., 30:] = False
    kv_range, kind = table[key_padding_op.opoverload](row)
    assert torch.equal(kv_range, key_padding_op(row)[0]) and kind.tolist() == [HOLES]  # exact for every row
    q, k, _ = qkv(b=1, n=100)
    lse = table[torch.ops.dam.last_rows_block_lse.default](q, k, BLOCK, True, 0.25)
    assert rel_err(lse[torch.isfinite(lse)], last_rows_block_lse(q, k, BLOCK, True, 0.25)[torch.isfinite(lse)]) < 1e-5
    lse = table[torch.ops.dam.sampled_rows_block_lse.default](q, k, BLOCK, 2, True, 0.25)
    kernel = sampled_rows_block_lse(q, k, BLOCK, 2, True, 0.25)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(kernel))
    assert rel_err(lse[torch.isfinite(lse)], kernel[torch.isfinite(lse)]) < 1e-5


class Site(torch.nn.Module):
    """One rewritten attention site as the pass writes it: a plan op, then the attention op."""

    def __init__(self, source):
        super().__init__()
        self.source = source

    def forward(self, q, k, v):
        if self.source == "streaming":
            plan = torch.ops.dam.streaming_plan(q, k, BLOCK, True, 0, "reference", 1, 2)
        else:
            plan = torch.ops.dam.dynamic_plan(q, k, BLOCK, True, 0, "reference", None, 0.3, 0.5, 0.8, 0.2, 0.5, 1,
                                              1, "sampled")
        return torch.ops.dam.sparse_attention(q, k, v, *plan, None, None, None, None, None, True, True, BLOCK, 0,
                                              "reference")


# The dynamic plan traces its estimate, the budget rule and the lists: slower.
@pytest.mark.parametrize("source", ["streaming", pytest.param("dynamic", marks=pytest.mark.slow)])
def test_an_exported_graph_decomposes_into_aten_and_computes_the_same(source):
    site = Site(source)
    program = torch.export.export(site, qkv(b=1, n=128, seed=8)).run_decompositions(decomposition_table())
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any(t.startswith("dam.") for t in targets), targets
    q, k, v = qkv(b=1, n=128, seed=9)  # fresh inputs, not the example ones
    out = program.module()(q, k, v)
    assert rel_err(out, site(q, k, v)) < 1e-5
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert rel_err(out, dense) > 1e-3  # the plan is sparse: equality means something
