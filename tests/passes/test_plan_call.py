"""The plan decision (``passes/plan_call.plan_call``): which plan op a call runs, with which tensors and
arguments, by source, by the profile's dynamic heads and by the query's length (one row: decode)."""

import dataclasses

import pytest
import torch

from dam_compile.config import DAMConfig
from dam_compile.ops.hybrid_plan import hybrid_token_pattern
from dam_compile.passes.plan_call import (
    DECODE_PLAN, DENSE_PLAN, DYNAMIC_PLAN, HYBRID_PLAN, PATH_ARGS, PATTERN_PLAN, STREAMING_PLAN, one_row, plan_call,
)

from dam_testing import one_module_profile

HEADS, PCL, BLOCK = 4, 16, 16
ENTRY = "model.layers.1.self_attn"


def options(source: str = "dynamic"):
    base = DAMConfig(block_size=BLOCK, min_seq_len=0, kernel="reference").mask_options()
    return dataclasses.replace(base, source=source, corner_len=PCL if source == "calibrated" else 0)


def profile(dynamic: list[int]):
    """A profile of one module whose ``dynamic`` heads run the dynamic plan, and its patterns."""
    return one_module_profile(dynamic, HEADS, PCL, ENTRY)


def qk(q_len: int, kv_len: int = 64):
    return torch.randn(1, HEADS, q_len, 16), torch.randn(1, 2, kv_len, 16)


@pytest.mark.parametrize("source, op, extra", [
    ("dense", DENSE_PLAN, set()),
    ("streaming", STREAMING_PLAN, {"sink_blocks", "local_blocks"}),
    ("dynamic", DYNAMIC_PLAN, {"scale", "tau", "density", "mass_target", "estimator"}),
])
def test_each_source_picks_its_prefill_op_and_a_one_row_query_the_decode_plan(source, op, extra):
    q, _ = qk(64)
    call = plan_call(options(source), q, is_causal=True, scale=0.25)
    assert call.op is op and not call.decode and not call.patterns
    assert {"block_size", "is_causal", *PATH_ARGS, *extra} <= set(call.kwargs)
    assert call.kwargs["is_causal"] is True and call.kwargs.get("scale", 0.25) == 0.25
    decode = plan_call(options(source), qk(1)[0], is_causal=False, scale=0.25)
    assert decode.op is DECODE_PLAN and decode.decode and decode.kwargs["source"] == source


def test_one_row_is_a_static_length_of_one():
    assert one_row(torch.empty(1, 2, 1, 8)) and not one_row(torch.empty(1, 2, 3, 8))


@pytest.mark.parametrize("dynamic, op", [([], PATTERN_PLAN), ([1, 3], HYBRID_PLAN), ([0, 1, 2, 3], DYNAMIC_PLAN)])
def test_the_profiles_dynamic_heads_choose_pattern_hybrid_or_dynamic(dynamic, op):
    site_profile, patterns = profile(dynamic)
    q, k = qk(64)
    call = plan_call(options("calibrated"), q, is_causal=True, scale=None, profile=site_profile, entry=ENTRY)
    assert call.op is op and call.dynamic_heads == tuple(dynamic)
    if op is DYNAMIC_PLAN:  # every head dynamic: no pattern left, nothing for the op to mask with
        assert call.token_pattern is None and not call.tensor_kwargs
        return
    expected = patterns if op is PATTERN_PLAN else hybrid_token_pattern(patterns, call.tensor_kwargs["dynamic_heads"],
                                                                          BLOCK)
    assert torch.equal(call.token_pattern.diagonals, expected.diagonals)
    assert torch.equal(call.token_pattern.corner, expected.corner)
    assert (call.tag != "") == (op is HYBRID_PLAN)  # the hybrid pattern depends on the block size
    plan = call.plan(call.run(q, k))
    assert plan.block_size == BLOCK and torch.equal(plan.token_diagonals, expected.diagonals)


def test_a_calibrated_decode_step_reads_the_patterns_and_its_dynamic_heads():
    site_profile, patterns = profile([2])
    call = plan_call(options("calibrated"), qk(1)[0], is_causal=False, scale=None, profile=site_profile,
                     entry=ENTRY)
    assert call.op is DECODE_PLAN and list(call.patterns) == ["diagonals", "columns"]
    assert call.tensor_kwargs["dynamic_heads"].tolist() == [False, False, True, False]
    assert call.token_pattern is None  # a decode plan's patterns feed only the plan


def test_calibrated_without_its_profile_entry_is_refused():
    with pytest.raises(ValueError, match="profile and entry"):
        plan_call(options("calibrated"), qk(64)[0], is_causal=True, scale=None)


def test_the_dynamic_part_and_the_planners_own_arguments():
    """The context-parallel ring runs the dynamic plan itself (its rows, per rank): a hybrid call's dynamic part
    has the dynamic plan's arguments, and the planner takes them without the op's path choice."""
    site_profile, _ = profile([1])
    hybrid = plan_call(options("calibrated"), qk(64)[0], is_causal=True, scale=0.5, profile=site_profile,
                       entry=ENTRY)
    dynamic = plan_call(options("dynamic"), qk(64)[0], is_causal=True, scale=0.5)
    assert hybrid.dynamic_call() == dynamic
    assert set(dynamic.kwargs) - set(dynamic.planner_kwargs) == set(PATH_ARGS)
    with pytest.raises(ValueError, match="no dynamic plan"):
        plan_call(options("dense"), qk(64)[0], is_causal=True, scale=None).dynamic_call()
