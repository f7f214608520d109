"""``passes/verify``: the structural check every rewrite passes before it is handed on. It accepts exactly the
original graph with each rewritten SDPA node replaced by its mask subgraph and op, and raises
``RewriteCheckError`` on anything else: damage elsewhere, a wrong mask subgraph, a rewrite built wrongly."""

import dataclasses
import operator

import pytest
import torch

from dam_compile.passes.find_sdpa import find_sdpa_sites
from dam_compile.passes.insert_mask import insert_mask_generation
from dam_compile.passes.pipeline import copy_graph_module, rewrite_attention
from dam_compile.passes.rewrite import SPARSE_ATTENTION, replace_with_sparse_attention
from dam_compile.passes.verify import (
    RewriteCheckError, RewrittenSite, check_rewrite, fx_to_digraph, graph_differences,
)

from dam_testing import attention_block_graph, mask_options

OPTIONS = mask_options()


def _rewrite_with_record():
    gm = attention_block_graph()
    result = rewrite_attention(gm, OPTIONS)
    return gm, result.graph_module, result.val_map, result.replaced


def test_checker_accepts_the_rewrite():
    gm, new_gm, val_map, sites = _rewrite_with_record()
    check_rewrite(gm.graph, new_gm.graph, val_map, sites)


def _first(graph, pred):
    return next(n for n in graph.nodes if pred(n))


@pytest.mark.parametrize("damage", ["retarget", "drop", "extra", "constant", "rewire"])
def test_checker_catches_damage_elsewhere(damage):
    gm, new_gm, val_map, sites = _rewrite_with_record()
    g = new_gm.graph
    add = _first(g, lambda n: n.op == "call_function" and n.target in (operator.add, torch.add))
    relu = _first(g, lambda n: "relu" in str(n.target))
    if damage == "retarget":
        add.target = operator.sub
    elif damage == "drop":
        add.replace_all_uses_with(relu)
        g.erase_node(add)
    elif damage == "extra":
        with g.inserting_after(relu):
            extra = g.call_function(torch.neg, (relu,))
        add.replace_input_with(relu, extra)
    elif damage == "constant":
        add.args = (add.args[0], 2)
    elif damage == "rewire":
        attn = sites[0].op
        add.replace_input_with(relu, attn)
    with pytest.raises(RewriteCheckError):
        check_rewrite(gm.graph, g, val_map, sites)


def test_checker_catches_a_wrong_mask_subgraph():
    gm, new_gm, val_map, sites = _rewrite_with_record()
    plan = sites[0].plan
    plan.args = (plan.args[1], plan.args[0], *plan.args[2:])  # query and key swapped
    with pytest.raises(RewriteCheckError, match="plan"):
        check_rewrite(gm.graph, new_gm.graph, val_map, sites)


def hand_made_rewrite(build):
    """``(original, rewritten, val_map, record)`` of a rewrite of :func:`attention_block_graph` made by hand, with
    ``build(graph, site, mask)`` (which returns the op it made) standing in for the replacement."""
    gm = attention_block_graph()
    new_gm, val_map = copy_graph_module(gm)
    (site,) = find_sdpa_sites(new_gm.graph)
    name = site.node.name
    mask = insert_mask_generation(new_gm, site, OPTIONS)
    op = build(new_gm.graph, site, mask)
    record = RewrittenSite(name, mask.plan.target, mask.plan, mask.outputs, op)
    return gm.graph, new_gm.graph, val_map, record


def test_a_correct_hand_made_rewrite_passes():
    original, rewritten, val_map, record = hand_made_rewrite(
        lambda graph, site, mask: replace_with_sparse_attention(graph, site, mask, OPTIONS))
    check_rewrite(original, rewritten, val_map, [record])


def test_an_op_reading_the_wrong_tensor_is_caught():
    """Key and value swapped at the op: the shapes agree, so only the structure tells."""
    original, rewritten, val_map, record = hand_made_rewrite(lambda graph, site, mask: replace_with_sparse_attention(
        graph, dataclasses.replace(site, key=site.value, value=site.key), mask, OPTIONS))
    with pytest.raises(RewriteCheckError, match=r"edge .* -> .*/attn changed|missing edge .*/attn"):
        check_rewrite(original, rewritten, val_map, [record])


def test_an_sdpa_node_left_next_to_its_op_is_caught():
    """The op inserted, but the users still read SDPA (replace_all_uses_with forgotten)."""

    def keep_sdpa(graph, site, mask):
        with graph.inserting_before(site.node):
            return graph.call_function(SPARSE_ATTENTION, (site.query, site.key, site.value, *mask.outputs,
                                                          None, None, None, None, None), {})

    original, rewritten, val_map, record = hand_made_rewrite(keep_sdpa)
    with pytest.raises(RewriteCheckError) as error:
        check_rewrite(original, rewritten, val_map, [record])
    sdpa = record.name
    assert f"unexpected node {sdpa}\n" in str(error.value) and f"missing edge {sdpa}/attn -> linear" in str(error.value)


def test_a_plan_output_the_record_leaves_out_is_caught():
    original, rewritten, val_map, record = hand_made_rewrite(
        lambda graph, site, mask: replace_with_sparse_attention(graph, site, mask, OPTIONS))
    with pytest.raises(RewriteCheckError, match="unexpected node unexpected:"):
        check_rewrite(original, rewritten, val_map, [dataclasses.replace(record, plan_outputs=record.plan_outputs[:3])])


@pytest.mark.parametrize("change, found", [
    (lambda site: site.op.update_kwarg("is_causal", False), "attn: is_causal=False"),
    (lambda site: site.plan.update_kwarg("is_causal", False), "plan: is_causal=False"),
    (lambda site: site.op.update_kwarg("enable_gqa", not site.op.kwargs["enable_gqa"]), "attn: enable_gqa"),
    (lambda site: setattr(site.op, "args", (*site.op.args[:-1], 123.0)), "attn: scale=123.0"),
], ids=["op loses is_causal", "plan loses is_causal", "enable_gqa flipped", "another scale"])
def test_a_constant_the_site_gives_is_compared(change, found):
    """``is_causal``, ``enable_gqa`` and the scale come from the call, not the config: a rewrite that changes
    one is caught although the graph's shape is right."""
    gm, rewritten, val_map, sites = _rewrite_with_record()
    assert sites[0].op.kwargs["is_causal"] and sites[0].plan.kwargs["is_causal"]  # the block is causal
    change(sites[0])
    with pytest.raises(RewriteCheckError, match=found):
        check_rewrite(gm.graph, rewritten.graph, val_map, sites)


def test_the_error_lists_twenty_differences_and_counts_the_rest():
    gm, new_gm, val_map, sites = _rewrite_with_record()
    g = new_gm.graph
    relu = _first(g, lambda n: "relu" in str(n.target))
    with g.inserting_after(relu):
        for _ in range(30):  # 30 unexpected nodes and 30 unexpected edges
            g.call_function(torch.neg, (relu,))
    with pytest.raises(RewriteCheckError) as error:
        check_rewrite(gm.graph, g, val_map, sites)
    lines = str(error.value).splitlines()
    assert len(lines) == 1 + 20 + 1 and lines[-1].strip() == "... and 40 more"


def test_fx_to_digraph_keeps_ops_targets_constants_and_argument_positions():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    y = g.call_function(operator.add, (x, x))
    z = g.call_function(torch.mul, (y, 2), {"out": None})
    g.output(z)
    d = fx_to_digraph(g)
    assert d.nodes["add"] == dict(op="call_function", target="_operator.add", consts="(('%', '%'), {})")
    assert d.nodes["mul"]["consts"] == "(('%', 2), {'out': None})" and d.nodes["mul"]["target"] == "torch.mul"
    assert d.edges["x", "add"]["pos"] == ("args.0", "args.1") and d.edges["add", "mul"]["pos"] == ("args.0",)
    assert d.edges["mul", "output"]["pos"] == ("args.0",)

    assert graph_differences(d, fx_to_digraph(g)) == []
    z.args = (y, 3)
    assert graph_differences(d, fx_to_digraph(g)) == [
        "node mul changed: {'op': 'call_function', 'target': 'torch.mul', 'consts': \"(('%', 2), {'out': None})\"} -> "
        "{'op': 'call_function', 'target': 'torch.mul', 'consts': \"(('%', 3), {'out': None})\"}"]
