"""The plan-density recorder: what ``dam::sparse_attention`` ran, prefill and decode apart, nothing when off."""

import sys
from pathlib import Path

import torch

import dam_compile
from dam_compile.plan.block_plan import BlockSparsePlan
from dam_compile.plan.reference import plan_density
from dam_compile.plan.plan_stats import PlanStats, recording

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # bench_plans: the random plans
from bench_plans import random_plan  # noqa: E402


def qkv(q_len, kv_len, heads=4, kv_heads=2):
    return torch.randn(1, heads, q_len, 16), torch.randn(1, kv_heads, kv_len, 16), torch.randn(1, kv_heads, kv_len, 16)


def test_prefill_and_decode_calls_are_recorded_apart_with_the_density_of_their_plans():
    q, k, v = qkv(128, 128)
    plan = random_plan(128, 128, 16, 0.4, 4, generator=torch.Generator().manual_seed(0))
    row = BlockSparsePlan.from_block_tables(torch.tensor([True, False, True, False, False, True])[None, None, None], 16)
    dq, dk, dv = qkv(1, 90)
    with PlanStats() as outer, PlanStats() as inner:
        assert recording()
        dam_compile.sparse_attention(q, k, v, plan, is_causal=True, enable_gqa=True, kernel="reference")
        dam_compile.sparse_attention(dq, dk, dv, row, enable_gqa=True, kernel="reference")
    assert outer == inner
    assert outer.prefill == [plan_density(plan, 128, 128, True)] and 0.3 < outer.prefill[0] < 0.5
    assert outer.decode == [3 / 6]  # kept blocks over the row's ceil(90 / 16) blocks
    assert not recording()


def test_a_dense_path_counts_as_full_density_and_nothing_is_recorded_when_off():
    q, k, v = qkv(64, 64)
    plan = random_plan(64, 64, 16, 0.5, 4)
    with PlanStats() as stats:
        dam_compile.sparse_attention(q, k, v, plan, is_causal=True, enable_gqa=True, min_seq_len=1000,
                                     kernel="reference")
    assert stats.prefill == [1.0] and stats.decode == []
    idle = PlanStats()
    dam_compile.sparse_attention(q, k, v, plan, is_causal=True, enable_gqa=True, kernel="reference")
    assert idle == PlanStats()
