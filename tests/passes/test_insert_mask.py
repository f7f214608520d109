"""Step (c), ``passes/insert_mask``: exactly one plan call per site, just before it, on the site's query and key
with the options' arguments by name, and one ``getitem`` per plan tensor; a calibrated site's patterns become
buffers of the graph module, registered once per profile entry."""

import operator

import pytest
import torch
import torch.nn.functional as F
from torch.fx import GraphModule

from dam_compile.passes.find_sdpa import find_sdpa_sites
from dam_compile.passes.insert_mask import DECODE_PLAN_TENSORS, PLAN_TENSORS, insert_mask_generation, is_decode
from dam_compile.passes.plan_call import DECODE_PLAN, HYBRID_PLAN, MASK_GENERATORS, PATTERN_PLAN

from dam_testing import capture_graph, mask_options, one_module_profile, sdpa_graph

ENTRY = "model.layers.1.self_attn"
STEM = "_dam_model_layers_1_self_attn"


def graph_module(q_len=64, **kwargs):
    """A graph module of one SDPA call on ``[1, 4, q_len, 16]`` queries and 64 keys whose fake values are on the
    CPU (the calibrated plan moves the profile to the query's device)."""
    q, k, v = torch.empty(1, 4, q_len, 16), torch.empty(1, 4, 64, 16), torch.empty(1, 4, 64, 16)
    return GraphModule(torch.nn.Module(), sdpa_graph(q=q, k=k, v=v, **kwargs))


def inserted(gm, before):
    """The nodes the insertion added, in graph order."""
    return [n for n in gm.graph.nodes if n not in before]


@pytest.mark.parametrize("source", ["dense", "streaming", "dynamic"])
def test_one_plan_call_and_a_getitem_per_plan_tensor_just_before_the_site(source):
    gm = graph_module(is_causal=True, scale=0.5)
    (site,) = find_sdpa_sites(gm.graph)
    before = set(gm.graph.nodes)
    options = mask_options(source)
    mask = insert_mask_generation(gm, site, options)
    assert inserted(gm, before) == [mask.plan, *mask.outputs]
    assert mask.plan.target is MASK_GENERATORS[source] and mask.plan.args == (site.query, site.key)
    assert mask.plan.kwargs == options.prefill_plan_kwargs(True, 0.5)
    assert len(mask.outputs) == PLAN_TENSORS
    assert [(o.target, o.args) for o in mask.outputs] == [(operator.getitem, (mask.plan, i)) for i in range(4)]
    assert mask.outputs[-1].next is site.node  # just before the site
    assert not mask.decode and mask.patterns == mask.op_patterns == mask.plan_inputs == () == mask.dynamic_heads


def test_every_site_gets_its_own_plan_on_its_own_query_and_key():
    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True) + F.scaled_dot_product_attention(k, q, v)

    (gm,) = capture_graph(f, *(torch.randn(1, 2, 32, 16) for _ in range(3)))
    sites = find_sdpa_sites(gm.graph)
    masks = [insert_mask_generation(gm, site, mask_options()) for site in sites]
    plans = [n for n in gm.graph.nodes if n.target is MASK_GENERATORS["dense"]]
    assert plans == [m.plan for m in masks] and len(plans) == 2
    assert [p.args for p in plans] == [(s.query, s.key) for s in sites]
    assert [p.kwargs["is_causal"] for p in plans] == [True, False]
    for site, mask in zip(sites, masks):  # where the site came from, for the reports and stack traces
        assert "in f" in site.node.meta["stack_trace"]
        assert mask.plan.meta["stack_trace"] == site.node.meta["stack_trace"]
        assert all(o.meta["stack_trace"] == site.node.meta["stack_trace"] for o in mask.outputs)
    gm.graph.lint()


def test_a_one_row_query_gets_the_decode_plan_on_the_mask_too():
    gm = graph_module(1, mask=torch.empty(1, 1, 1, 64, dtype=torch.bool))
    (site,) = find_sdpa_sites(gm.graph)
    assert is_decode(site)
    mask = insert_mask_generation(gm, site, mask_options("dynamic"))
    assert mask.plan.target is DECODE_PLAN and mask.decode
    assert mask.plan.args == (site.query, site.key, site.attn_mask, None, None)
    assert mask.plan.kwargs == mask_options("dynamic").decode_plan_kwargs(None)
    assert len(mask.outputs) == DECODE_PLAN_TENSORS


def get_attrs(gm):
    return {n.target for n in gm.graph.nodes if n.op == "get_attr"}


def test_a_calibrated_site_reads_its_patterns_from_buffers_registered_once():
    profile, patterns = one_module_profile()
    gm = graph_module()
    (site,) = find_sdpa_sites(gm.graph)
    mask = insert_mask_generation(gm, site, mask_options("calibrated"), profile, ENTRY)
    names = [f"{STEM}_{label}" for label in ("diagonals", "columns", "corner")]
    assert mask.plan.target is PATTERN_PLAN and mask.plan.args == (site.query, site.key, *mask.patterns)
    assert [p.target for p in mask.patterns] == names and mask.op_patterns == mask.patterns
    for name, value in zip(names, (patterns.diagonals, patterns.columns, patterns.corner)):
        assert getattr(gm, name).shape == value.shape and name in dict(gm.named_buffers())
    assert "_dam" not in "".join(gm.state_dict())  # not persistent: no checkpoint carries them

    # Another site of the same module (a second call, a decode graph built later) reuses the buffers.
    buffers = dict(gm.named_buffers())
    again = insert_mask_generation(gm, site, mask_options("calibrated"), profile, ENTRY)
    assert dict(gm.named_buffers()).keys() == buffers.keys() and get_attrs(gm) == set(names)
    assert [p.target for p in again.patterns] == names and again.patterns != mask.patterns  # new get_attr nodes


def test_a_hybrid_site_passes_its_dynamic_heads_by_name():
    profile, _ = one_module_profile(dynamic=[1, 3])
    gm = graph_module()
    (site,) = find_sdpa_sites(gm.graph)
    mask = insert_mask_generation(gm, site, mask_options("calibrated"), profile, ENTRY)
    assert mask.plan.target is HYBRID_PLAN and mask.dynamic_heads == (1, 3)
    (heads,) = mask.plan_inputs
    assert mask.plan.kwargs["dynamic_heads"] is heads and heads.target == f"{STEM}_dynamic_heads"
    assert getattr(gm, heads.target).tolist() == [False, True, False, True]
    # The token pattern depends on the block size: its buffers say which.
    assert all(p.target.startswith(f"{STEM}_hybrid16_") for p in mask.patterns)


def test_a_calibrated_decode_step_feeds_its_patterns_to_the_plan_only():
    profile, _ = one_module_profile(dynamic=[2])
    gm = graph_module(1)
    (site,) = find_sdpa_sites(gm.graph)
    mask = insert_mask_generation(gm, site, mask_options("calibrated"), profile, ENTRY)
    assert mask.plan.target is DECODE_PLAN and mask.decode and mask.op_patterns == ()
    assert mask.plan.args == (site.query, site.key, None, *mask.patterns) and len(mask.patterns) == 2
    assert [p.target for p in mask.plan_inputs] == [f"{STEM}_dynamic_heads"]


def test_buffers_of_a_dynamo_graph_get_a_source_for_aot_autograd():
    (gm,) = capture_graph(lambda q: F.scaled_dot_product_attention(q, q, q), torch.randn(1, 4, 32, 16))
    assert hasattr(gm, "_param_name_to_source")
    (site,) = find_sdpa_sites(gm.graph)
    insert_mask_generation(gm, site, mask_options("calibrated"), one_module_profile()[0], ENTRY)
    assert {f"{STEM}_{label}" for label in ("diagonals", "columns", "corner")} <= gm._param_name_to_source.keys()
