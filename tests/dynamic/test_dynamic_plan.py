"""Dynamic (per-input) DAM plans, and the fidelity metrics they are judged by."""

import math
import sys
from pathlib import Path

import pytest
import torch

import dam_compile
from dam_compile.plan.block_plan import BlockSparsePlan
from dam_compile.plan.structured_plans import dense_plan, streaming_plan
from dam_compile.plan.reference import token_mask
from dam_compile.dynamic.dynamic_plan import dynamic_block_plan
from dam_compile.dynamic.estimators import ESTIMATORS
from dam_compile.metrics import attention_mass_recall, density_per_head, output_error
from dam_compile.reference_mode import SparseReferenceMode

from dam_testing import rel_err
from hf_models import build, ids_for

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # bench_plans: the random plans
from bench_plans import random_plan  # noqa: E402

L, D, BLOCK = 2048, 32, 32
COLUMN, OFFSET = 40, 100


def planted(width=1, seed=0):
    """Head 0 attends to the keys ``[40, 40 + width)`` (a vertical band), head 1 to the key 100 tokens back (a
    diagonal); the rest of the scores are noise. Returns q [1, 2, L, D], k [1, 2, L, D]."""
    g = torch.Generator().manual_seed(seed)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    strength = 20.0 * math.sqrt(D)  # 20 nats after the 1/sqrt(D) scale: the planted keys hold > 99% of the mass
    k = unit(2, L, D)
    q = 0.3 * unit(2, L, D)
    direction = unit(D)
    k[0, COLUMN:COLUMN + width] = direction
    q[0] += strength * direction
    q[1, OFFSET:] += strength * k[1, : L - OFFSET]
    return q[None], k[None]


def density_bound(cap: float, local_blocks: int, extra_rows_blocks: int = 0) -> float:
    """The most a head may keep at ``L`` tokens: its sink column and ``local_blocks`` diagonals, plus ``cap`` of
    its other visible blocks (plus ``extra_rows_blocks`` kept outside the cap)."""
    nk = L // BLOCK
    visible = nk * (nk + 1) // 2
    forced = nk + sum(nk - d for d in range(local_blocks)) - 1  # the sink column and the diagonals share (0, 0)
    return (forced + math.floor(cap * (visible - forced)) + extra_rows_blocks) / visible


def plan_of(q, k, **options):
    counts, indices, full_counts, full_indices = dynamic_block_plan(q, k, block_size=BLOCK, is_causal=True, **options)
    return BlockSparsePlan(counts, indices, BLOCK, full_counts, full_indices)


# Mean pooling dilutes a single key by the block size, so the pooled estimate needs patterns a few tokens wide;
# the last-block estimate reads exact scores and finds single-token ones (at a higher cost: bench_maskgen.py).
@pytest.mark.parametrize("estimator, width", [("pooled", 8), ("last_block", 1), ("last_block", 8), ("adaptive", 1),
                                              ("adaptive", 8)])
def test_recovers_planted_column_and_diagonal(estimator, width):
    q, k = planted(width)
    plan = plan_of(q, k, estimator=estimator, sink_blocks=1, local_blocks=1, density=0.15)
    plan.validate(batch=1, heads=2, q_len=L, kv_len=L)
    density = density_per_head(plan, L, L, True)[0]
    assert (density <= density_bound(0.15, local_blocks=1) + 1e-9).all(), density
    # The per-row budget grows with the row's length, so the first rows keep little beyond sink and window;
    # from row 1024 on every row has room for the planted blocks.
    rows = slice(1024, L)
    recall = attention_mass_recall(q[:, :, rows], k, plan_rows(plan, 1024), is_causal=True, q_offset=1024)[0]
    heads = [0] if estimator == "pooled" else [0, 1]  # pooling misses the one-token diagonal (0.90 recall)
    assert (recall[heads] >= 0.95).all(), recall
    kept = token_mask(plan, L, L, True)[0]
    rows = torch.arange(1024, L)
    assert kept[0, rows, COLUMN].all()  # the vertical
    if estimator != "pooled":
        assert kept[1, rows, rows - OFFSET].all()  # the diagonal
    streaming = streaming_plan(L, L, BLOCK, True, 1, 1)
    assert (attention_mass_recall(q, k, streaming, is_causal=True)[0] < 0.5).all()  # a window misses both


def plan_rows(plan: BlockSparsePlan, first_row: int) -> BlockSparsePlan:
    """The plan of the query rows from ``first_row`` on (a whole number of blocks)."""
    m = first_row // plan.block_size
    return BlockSparsePlan(plan.kv_num_blocks[..., m:], plan.kv_indices[..., m:, :], plan.block_size,
                           plan.full_kv_num_blocks[..., m:], plan.full_kv_indices[..., m:, :])


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_density_cap_bounds_every_head(estimator):
    q, k = torch.randn(1, 4, L, D), torch.randn(1, 2, L, D)
    for cap in (0.05, 0.1, 0.3):
        plan = plan_of(q, k, density=cap, mass_target=1.0, estimator=estimator)
        density = density_per_head(plan, L, L, True)
        assert (density <= density_bound(cap, local_blocks=2) + 1e-9).all()
        assert (density >= density_bound(cap, local_blocks=2) - 0.02).all()  # noise needs every block: the cap binds


def question_needle(seed=0):
    """Head 0: only the last 16 queries (the question) attend to key 700 (a one-token needle); every other
    score is noise. Head 1: noise. q [1, 2, L, D], k [1, 2, L, D]."""
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, 2, L, D, generator=g), torch.randn(1, 2, L, D, generator=g)
    q[0, 0, -16:] += 3.0 * k[0, 0, 700]
    return q, k


def test_adaptive_last_row_keeps_the_needle_the_question_asks_for():
    q, k = question_needle()
    kept = {e: token_mask(plan_of(q, k, estimator=e, density=0.1), L, L, True)[0] for e in ESTIMATORS}
    assert kept["adaptive"][0, -16:, 700].all()
    assert not kept["pooled"][0, -16:, 700].any()  # a mean over 32 keys dilutes one key below the noise


def test_adaptive_last_row_keeps_a_needle_one_query_of_the_block_asks_for():
    """The question's last token alone attends to key 700 (about a tenth of its mass); the other 31 queries of the
    last block attend to the block's first key. Averaged over the block the needle holds under 1% of the mass,
    so a mass target on the block's mean would drop it; every query's own need keeps it."""
    g = torch.Generator().manual_seed(0)
    q, k = 0.1 * torch.randn(1, 1, L, D, generator=g), 0.1 * torch.randn(1, 1, L, D, generator=g)
    local, needle = torch.zeros(D), torch.zeros(D)
    local[0], needle[1] = 1.0, 1.0
    strong = 20.0 * math.sqrt(D)  # 20 nats after the 1/sqrt(D) scale
    k[0, 0, L - BLOCK] += math.sqrt(strong) * local
    k[0, 0, 700] += math.sqrt(strong) * needle
    q[0, 0, L - BLOCK:] += math.sqrt(strong) * local
    q[0, 0, -1] += math.sqrt(strong - math.log(10) * math.sqrt(D)) * needle  # about 10:1 local to needle
    kept = token_mask(plan_of(q, k, estimator="adaptive", density=0.1), L, L, True)[0, 0]
    assert kept[-1, 700]
    scores = (q[0, 0, L - BLOCK:] @ k[0, 0].T) / math.sqrt(D)
    probs = torch.softmax(scores.masked_fill(torch.ones(BLOCK, L, dtype=torch.bool).triu(L - BLOCK + 1), -math.inf), -1)
    assert probs[-1, 700] > 0.1 and probs[:, 700 // BLOCK * BLOCK:][:, :BLOCK].sum(-1).mean() < 0.01


def test_adaptive_keeps_a_needle_asked_from_the_block_before_a_ragged_last_block():
    """A prompt 8 tokens past a block boundary: the question's token that asks for key 700 sits in the
    second-to-last query block (the question is split over the two). That block's queries are exact too."""
    n = L + 8
    g = torch.Generator().manual_seed(1)
    q, k = 0.05 * torch.randn(1, 1, n, D, generator=g), 0.05 * torch.randn(1, 1, n, D, generator=g)
    local, needle = torch.zeros(D), torch.zeros(D)
    local[0], needle[1] = 1.0, 1.0
    strong = 20.0 * math.sqrt(D)
    start = L - BLOCK  # the second-to-last query block
    k[0, 0, start] += math.sqrt(strong) * local
    k[0, 0, 700] += math.sqrt(strong) * needle
    q[0, 0, start:] += math.sqrt(strong) * local
    asks = L - 4
    q[0, 0, asks] += math.sqrt(strong - math.log(10) * math.sqrt(D)) * needle
    plan = plan_of(q, k, estimator="adaptive", density=0.1)
    plan.validate(batch=1, heads=1, q_len=n, kv_len=n)
    kept = token_mask(plan, n, n, True)[0, 0]
    assert kept[asks, 700]
    probs = torch.softmax((q[0, 0, asks] @ k[0, 0, :asks + 1].T) / math.sqrt(D), -1)
    assert probs[700] > 0.05


def test_adaptive_budgets_follow_the_mass():
    """A head whose rows put their mass on one column keeps fewer blocks than a head of diffuse noise, which
    fills the cap."""
    q, k = planted(width=8)
    q[0, 1] = 0.05 * torch.randn(L, D)  # head 1: nearly uniform attention
    uncapped = density_per_head(plan_of(q, k, estimator="adaptive", density=1.0), L, L, True)[0]
    assert uncapped[0] < 0.5 * uncapped[1]
    capped = density_per_head(plan_of(q, k, estimator="adaptive", density=0.2), L, L, True)[0]
    assert (capped <= density_bound(0.2, local_blocks=2) + 1e-9).all()
    assert capped[1] > density_bound(0.2, local_blocks=2) - 0.02


def test_adaptive_uses_the_query_aware_estimate_where_the_last_block_supports_it():
    """Every query block attends to its own key block two blocks back (queries and keys share a per-block
    direction): the pooled estimate sees it, and the last block's exact mass agrees with pooling there, so the
    adaptive plan keeps each row's block, which vertical-slash lines from the last block alone would also
    keep only by its diagonal; a block-dependent target (a permutation) tells them apart."""
    g = torch.Generator().manual_seed(0)
    nk = L // BLOCK
    target = [max(0, m - 2 - (m * 7) % 5) for m in range(nk)]  # varies with the row: not one diagonal
    directions = torch.nn.functional.normalize(torch.randn(nk, D, generator=g), dim=-1)
    q = 0.1 * torch.randn(1, 1, L, D, generator=g)
    k = 0.1 * torch.randn(1, 1, L, D, generator=g)
    for m, n in enumerate(target):
        q[0, 0, m * BLOCK:(m + 1) * BLOCK] += 4.0 * directions[m]
        k[0, 0, n * BLOCK:(n + 1) * BLOCK] += 4.0 * directions[m] if n not in target[:m] else 0.0
    mask = {e: token_mask(plan_of(q, k, estimator=e, density=0.3), L, L, True)[0, 0]
            for e in ("adaptive", "last_block")}
    rows = [m for m in range(8, nk) if target[m] not in target[:m]]
    hits = {e: sum(bool(t[m * BLOCK, target[m] * BLOCK]) for m in rows) for e, t in mask.items()}
    assert hits["adaptive"] == len(rows)
    assert hits["last_block"] < len(rows)


MOVING_L = 768  # 24 blocks: the sampled estimator's kernel runs every row block (slow in the interpreter)


def moving_targets(strength=4.0, seed=0):
    """Query block ``m`` attends to key block ``target[m]`` (a different block for nearly every row, not one
    column or diagonal), with a direction shared by its queries and that block's keys; the rest is noise.
    Returns ``(q [1, 1, MOVING_L, D], k [1, 1, MOVING_L, D], target)``."""
    g = torch.Generator().manual_seed(seed)
    nk = MOVING_L // BLOCK
    target = [max(0, m - 2 - (m * 7) % 5) for m in range(nk)]
    directions = torch.nn.functional.normalize(torch.randn(nk, D, generator=g), dim=-1)
    q = 0.1 * torch.randn(1, 1, MOVING_L, D, generator=g)
    k = 0.1 * torch.randn(1, 1, MOVING_L, D, generator=g)
    for m, n in enumerate(target):
        q[0, 0, m * BLOCK:(m + 1) * BLOCK] += strength * directions[m]
        k[0, 0, n * BLOCK:(n + 1) * BLOCK] += strength * directions[m] if n not in target[:m] else 0.0
    return q, k, target


def test_sampled_estimate_finds_each_rows_own_block():
    """Every query block, not only the last, keeps the key block its queries attend to: the sampled rows' exact
    mass sees it; the last block's vertical-slash lines cannot."""
    q, k, target = moving_targets()
    n, nk = MOVING_L, MOVING_L // BLOCK
    # From row 8 on the cap leaves each row room beyond sink and window (noise elsewhere wants every block).
    rows = [m for m in range(8, nk) if target[m] not in target[:m]]
    for estimator, expected in (("sampled", len(rows)), ("last_block", None)):
        kept = token_mask(plan_of(q, k, estimator=estimator, density=0.3), n, n, True)[0, 0]
        hits = sum(bool(kept[m * BLOCK, target[m] * BLOCK]) for m in rows)
        assert (hits == expected) if expected is not None else (hits < len(rows)), (estimator, hits)


def test_sampled_plan_keeps_the_mass_target_of_every_row_without_a_cap():
    """With no cap, each query row keeps at least about ``mass_target`` of its exact attention (rows of one
    block share their blocks, so a row may keep more); a diffuse head keeps far more blocks than a focused
    one."""
    q, k, _ = moving_targets(strength=12.0)  # each row's block holds nearly all its mass
    q = torch.cat([q, 0.05 * torch.randn_like(q)], dim=1)  # head 1: nearly uniform attention
    k = torch.cat([k, k], dim=1)
    plan = plan_of(q, k, estimator="sampled", density=1.0, mass_target=0.9)
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(D)
    causal = torch.ones(MOVING_L, MOVING_L, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    kept_per_row = (probs * token_mask(plan, MOVING_L, MOVING_L, True)).sum(-1)[0]  # [heads, rows]
    assert (kept_per_row >= 0.9).all(), kept_per_row.min(-1)
    density = density_per_head(plan, MOVING_L, MOVING_L, True)[0]
    assert density[0] < 0.5 * density[1], density
    assert density[1] > 0.8, density  # no cap cuts the diffuse head


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("q_len, kv_len, heads, kv_heads", [(1000, 1000, 4, 2), (300, 700, 2, 2), (64, 64, 8, 1)])
def test_plans_are_valid_for_the_kernel(causal, q_len, kv_len, heads, kv_heads):
    q, k = torch.randn(2, heads, q_len, D), torch.randn(2, kv_heads, kv_len, D)
    for estimator in ESTIMATORS:
        counts, indices, full_counts, full_indices = dynamic_block_plan(
            q, k, block_size=BLOCK, is_causal=causal, estimator=estimator)
        plan = BlockSparsePlan(counts, indices, BLOCK, full_counts, full_indices)
        plan.validate(batch=2, heads=heads, q_len=q_len, kv_len=kv_len)
        # The op's fake outputs are contiguous; Inductor asserts the real ones' strides match.
        assert all(t.is_contiguous() for t in (counts, indices, full_counts, full_indices))


def test_kernel_runs_a_dynamic_plan_exactly():
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs the kernel in the interpreter
    q, k = (t.to(device) for t in planted())
    v = torch.randn_like(k)
    plan = plan_of(q, k)
    out = dam_compile.sparse_attention(q, k, v, plan, is_causal=True, kernel="triton")
    expected = dam_compile.plan.block_sparse_attention_reference(q, k, v, plan, is_causal=True)
    assert rel_err(out, expected) < 1e-5


def test_compiled_dynamic_model_equals_eager_with_the_same_plans():
    model = build("llama")
    x = ids_for("llama", n=96)
    options = {"kernel": "reference", "min_seq_len": 0, "block_size": 16, "inner_backend": "aot_eager",
               "density": 0.5, "dense_layers": 0}
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend="dam", options=options)(x).logits
        with SparseReferenceMode(options, model):
            expected = model(x).logits
    assert [s.mask_source for s in dam_compile.graph_reports()[-1].sites] == ["dynamic", "dynamic"]
    assert rel_err(out, expected) < 1e-5


def test_mass_recall_and_density_definitions():
    q, k = torch.randn(1, 2, 96, 16), torch.randn(1, 2, 96, 16)
    dense = dense_plan(96, 96, 16, True)
    assert torch.allclose(attention_mass_recall(q, k, dense, is_causal=True), torch.ones(1, 2, dtype=torch.float64))
    assert torch.allclose(density_per_head(dense, 96, 96, True), torch.ones(1, 1, dtype=torch.float64))
    window = streaming_plan(96, 96, 16, True, 1, 1)
    probs = torch.softmax((q @ k.transpose(-1, -2) / 4).masked_fill(torch.ones(96, 96).triu(1).bool(), -torch.inf), -1)
    by_hand = (probs * token_mask(window, 96, 96, True)).sum(-1).mean(-1).double()
    recall = attention_mass_recall(q, k, window, is_causal=True, max_chunk_elements=2 * 96 * 16)
    assert torch.allclose(recall, by_hand, atol=1e-6)
    assert density_per_head(window, 96, 96, True).item() == pytest.approx(11 / 21)  # 6 sink/diag + 5 neighbours
    assert output_error(torch.ones(3), torch.ones(3)) == 0.0


def test_top_mass_plan_keeps_the_most_mass_for_its_budget():
    from dam_compile.metrics import top_mass_plan

    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 4, 200, 16, generator=g), torch.randn(1, 2, 200, 16, generator=g)
    block = 16
    rand = random_plan(200, 200, block, 0.3, 4, generator=g)
    oracle = top_mass_plan(q, k, block, rand.kept_blocks())
    assert torch.equal(oracle.kept_blocks(), rand.kept_blocks())  # same budget in every row
    recall = lambda plan: attention_mass_recall(q, k, plan, is_causal=True, enable_gqa=True)  # noqa: E731
    assert (recall(oracle) >= recall(rand) - 1e-9).all()
    everything = top_mass_plan(q, k, block, torch.full((1, 4, 13), 13))
    assert torch.allclose(recall(everything), torch.ones(1, 4, dtype=torch.float64))


@pytest.mark.slow  # traces the plan with dynamic shapes, twice
def test_plan_traces_with_dynamic_shapes_at_aligned_and_ragged_lengths():
    """On CUDA the op compiles the plan once with dynamic shapes (``ops/attention.py``'s ``compiled_planner``);
    the trace (fake tensors, the last-rows kernel op's fake, the ragged-block branch) must give the eager plan at
    every length."""
    compiled = torch.compile(dynamic_block_plan, dynamic=True, fullgraph=True, backend="aot_eager")
    for n in (264, 256):
        q, k = torch.randn(1, 4, n, D), torch.randn(1, 2, n, D)
        got = compiled(q, k, block_size=BLOCK, is_causal=True)
        want = dynamic_block_plan(q, k, block_size=BLOCK, is_causal=True)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), n


@pytest.mark.parametrize("world", [2, 4])
def test_a_query_shard_plans_the_rows_the_whole_sequence_plans(world):
    """Context parallelism's plan (dynamic.dynamic_plan.QueryShard), in one process: each rank's blocks in
    head-tail order against all keys, the sums and minima over all rows taken over every rank's (recorded in a
    first pass, added, handed back in a second), give the whole sequence's plan rows, a cap binding included."""
    from dam_compile.dynamic.dynamic_plan import QueryShard

    n, block = 512, 32
    q, k = torch.randn(1, 4, n, D), torch.randn(1, 2, n, D)
    q[0, 0, -16:] += 3.0 * k[0, 0, 300]  # the last block's question: its rank's exact rows keep the needle
    options = dict(block_size=block, is_causal=True, density=0.3, mass_target=0.9)
    lists = dynamic_block_plan(q, k, **options)
    partial, full = BlockSparsePlan(*lists[:2], block, *lists[2:]).block_tables(n)
    whole = partial | full
    chunk = n // (2 * world) // block  # blocks per chunk
    shards = [torch.cat([torch.arange(r * chunk, (r + 1) * chunk),
                         torch.arange((2 * world - 1 - r) * chunk, (2 * world - r) * chunk)]) for r in range(world)]

    def plan(rank, reduce_sum, reduce_min):
        blocks = shards[rank]
        rows = torch.cat([q[:, :, b * block:(b + 1) * block] for b in blocks.tolist()], dim=2)
        shard = QueryShard(blocks, n, reduce_sum, reduce_min)
        lists = dynamic_block_plan(rows, k, **options, shard=shard)
        partial, full = BlockSparsePlan(*lists[:2], block, *lists[2:]).block_tables(n)
        return partial | full

    records = [{"sum": [], "min": []} for _ in range(world)]
    for rank in range(world):
        keep = lambda kind, r=rank: (lambda t: records[r][kind].append(t) or t)  # noqa: E731
        plan(rank, keep("sum"), keep("min"))
    totals = {kind: [torch.stack(parts).sum(0) if kind == "sum" else torch.stack(parts).amin(0)
                     for parts in zip(*(records[r][kind] for r in range(world)))] for kind in ("sum", "min")}
    for rank in range(world):
        calls = {"sum": iter(totals["sum"]), "min": iter(totals["min"])}
        rows = plan(rank, lambda t: next(calls["sum"]), lambda t: next(calls["min"]))
        assert torch.equal(rows, whole[:, :, shards[rank]]), rank
    assert (whole.sum(-1) < torch.arange(1, n // block + 1)).any()  # sparse: equality means something
