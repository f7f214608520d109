"""Step (d), ``passes/rewrite``: the SDPA node gives way to ``dam::sparse_attention`` fed by its mask subgraph;
every user of the old node reads the new one, which keeps where it came from and computes the same attention."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.fx import GraphModule

from dam_compile.passes.find_sdpa import find_sdpa_sites
from dam_compile.passes.insert_mask import PLAN_OP_ARGS, insert_mask_generation
from dam_compile.passes.key_padding import insert_key_padding
from dam_compile.passes.rewrite import SPARSE_ATTENTION, replace_with_sparse_attention

from dam_testing import capture_graph, mask_options, one_module_profile, rel_err, run_graph, sdpa_graph

ENTRY = "model.layers.1.self_attn"


def two_users(q, k, v, mask):
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    return out.relu(), out * 2


def inputs():
    q, k, v = (torch.randn(1, 4, 40, 16) for _ in range(3))
    return dict(q=q, k=k, v=v, mask=torch.rand(1, 1, 40, 40) < 0.8)


def rewrite(gm, options, profile=None, entry=None):
    """``(site, mask subgraph, the site's users before, the op)`` of the one site of ``gm``, rewritten."""
    (site,) = find_sdpa_sites(gm.graph)
    mask = insert_mask_generation(gm, site, options, profile, entry)
    users = list(site.node.users)
    new = replace_with_sparse_attention(gm.graph, site, mask, options)
    return site, mask, users, new


def test_the_op_replaces_the_node_and_keeps_its_users():
    values = inputs()
    (gm,) = capture_graph(two_users, **values)
    old_meta = dict(find_sdpa_sites(gm.graph)[0].node.meta)
    options = mask_options()
    site, mask, users, new = rewrite(gm, options)
    assert site.node not in gm.graph.nodes and not find_sdpa_sites(gm.graph)
    assert len(users) == 2 and list(new.users) == users and all(new in u.args for u in users)
    assert new.target is SPARSE_ATTENTION and new.prev is mask.outputs[-1]  # where the node was, after its plan
    assert new.args == (site.query, site.key, site.value, *mask.outputs, None, None, None, site.attn_mask, 0.3)
    assert new.kwargs == options.attention_kwargs(False, False)
    for key in ("stack_trace", "source_fn_stack"):  # where it came from, for the reports and error messages
        assert new.meta[key] == old_meta[key]
    assert "example_value" not in new.meta  # its shapes are the op's own
    gm.graph.lint()
    gm.recompile()
    for out, expected in zip(run_graph(gm, **values), two_users(**values), strict=True):
        assert rel_err(out, expected) < 1e-5


def test_the_op_takes_the_flags_of_the_site():
    gm = GraphModule(torch.nn.Module(), sdpa_graph(k=torch.empty(1, 2, 64, 16), v=torch.empty(1, 2, 64, 16),
                                                   q=torch.empty(1, 4, 64, 16), is_causal=True, enable_gqa=True))
    options = mask_options("streaming", min_seq_len=7)
    _, _, _, new = rewrite(gm, options)
    assert new.kwargs == dict(is_causal=True, enable_gqa=True, block_size=16, min_seq_len=7, kernel="reference")
    assert new.args[3 + PLAN_OP_ARGS:] == (None, None)  # no mask, SDPA's own scale


@pytest.mark.parametrize("q_len, patterns_at_op", [(64, 3), (1, 0)], ids=["prefill", "decode"])
def test_a_calibrated_prefill_op_reads_the_token_pattern_and_a_decode_op_does_not(q_len, patterns_at_op):
    gm = GraphModule(torch.nn.Module(), sdpa_graph(q=torch.empty(1, 4, q_len, 16), k=torch.empty(1, 4, 64, 16),
                                                   v=torch.empty(1, 4, 64, 16)))
    _, mask, _, new = rewrite(gm, mask_options("calibrated"), one_module_profile()[0], ENTRY)
    plan_args = new.args[3:3 + PLAN_OP_ARGS]
    given = (*mask.outputs, *mask.patterns[:patterns_at_op])
    assert plan_args == (*given, *(None,) * (PLAN_OP_ARGS - len(given)))
    assert len(mask.outputs) + patterns_at_op == (7 if q_len > 1 else 2)


def test_a_causal_and_padding_mask_reaches_the_op_as_its_row_and_description():
    def f(q, k, v, padding):
        i = torch.arange(q.shape[-2])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=(i[None, :] <= i[:, None]) & padding[:, None, None, :])

    (gm,) = capture_graph(f, *(torch.randn(2, 2, 40, 16) for _ in range(3)), torch.ones(2, 40, dtype=torch.bool))
    (site,) = find_sdpa_sites(gm.graph)
    padding = insert_key_padding(site.attn_mask)
    site = dataclasses.replace(site, attn_mask=padding.row, is_causal=True)  # as causal_mask reads it
    options = mask_options()
    mask = insert_mask_generation(gm, site, options)
    new = replace_with_sparse_attention(gm.graph, site, mask, options, padding)
    assert new.args[3 + PLAN_OP_ARGS] is padding.row
    assert new.kwargs == {**options.attention_kwargs(True, False), "kv_range": padding.kv_range,
                          "padding_kind": padding.kind}
