"""``passes/key_padding`` (the op itself: tests/ops/test_key_padding.py): a causal-and-padding mask's last row and
one ``dam::key_padding`` call on it, inserted right after the mask once per graph: every site that shares the mask
(HF hands one to every layer) reads them."""

import operator

import torch
import torch.nn.functional as F

from dam_compile.passes.causal_mask import KEY_PADDING_ROW
from dam_compile.passes.decide import example_value
from dam_compile.passes.find_sdpa import find_sdpa_sites
from dam_compile.passes.key_padding import KEY_PADDING, insert_key_padding
from dam_compile.passes.pipeline import rewrite_attention
from dam_compile.passes.rewrite import SPARSE_ATTENTION

from dam_testing import capture_graph, mask_options, rel_err, run_graph

BATCH, N = 2, 40


def causal_and_padding(n, padding):
    i = torch.arange(n)
    return (i[None, :] <= i[:, None]) & padding[:, None, None, :].bool()


def two_layers(q, k, v, padding):
    """Two attention calls on one mask, with a residual between them, as a HuggingFace model makes them."""
    mask = causal_and_padding(q.shape[-2], padding)
    h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask) + q
    return F.scaled_dot_product_attention(h, k, v, attn_mask=mask)


def inputs():
    q, k, v = (torch.randn(BATCH, 2, N, 16) for _ in range(3))
    padding = torch.ones(BATCH, N, dtype=torch.long)
    padding[1, 31:] = 0  # right padding: every query row keeps key 0
    return q, k, v, padding


def test_the_row_and_its_description_are_inserted_right_after_the_mask():
    (gm,) = capture_graph(two_layers, *inputs())
    first, _ = find_sdpa_sites(gm.graph)
    mask = first.attn_mask
    nodes = insert_key_padding(mask)
    order = list(gm.graph.nodes)
    at = order.index(mask)
    assert order[at + 1:at + 5] == [nodes.row, nodes.call, nodes.kv_range, nodes.kind]
    assert nodes.row.target is operator.getitem and nodes.row.args == (mask, KEY_PADDING_ROW)
    assert nodes.call.target is KEY_PADDING and nodes.call.args == (nodes.row,)
    assert (nodes.kv_range.args, nodes.kind.args) == ((nodes.call, 0), (nodes.call, 1))
    gm.graph.lint()


def test_the_inserted_nodes_carry_fake_values_and_the_masks_origin():
    """The next passes (and AOTAutograd) read their shapes; the reports read where they came from."""
    (gm,) = capture_graph(two_layers, *inputs())
    mask = find_sdpa_sites(gm.graph)[0].attn_mask
    nodes = insert_key_padding(mask)
    assert tuple(example_value(nodes.row).shape) == (BATCH, 1, 1, N) and example_value(nodes.row).dtype == torch.bool
    kv_range, kind = example_value(nodes.kv_range), example_value(nodes.kind)
    assert (tuple(kv_range.shape), kv_range.dtype) == ((BATCH, 2), torch.int32)
    assert (tuple(kind.shape), kind.dtype, kind.device.type) == ((1,), torch.int64, "cpu")
    assert example_value(nodes.call) == (kv_range, kind)
    for node in (nodes.row, nodes.call, nodes.kv_range, nodes.kind):
        assert node.meta["stack_trace"] == mask.meta["stack_trace"]


def test_roles_name_the_nodes_by_their_mask():
    """The structural check keys the shared nodes by the mask, so every site of the mask expects the same ones."""
    (gm,) = capture_graph(two_layers, *inputs())
    nodes = insert_key_padding(find_sdpa_sites(gm.graph)[0].attn_mask)
    stem = f"{nodes.mask.name}/key_padding"
    assert nodes.roles() == {nodes.row: f"{stem}.row", nodes.call: f"{stem}.call",
                             nodes.kv_range: f"{stem}.kv_range", nodes.kind: f"{stem}.kind"}


def test_every_site_of_a_mask_reads_one_shared_description():
    q, k, v, padding = inputs()
    (gm,) = capture_graph(two_layers, q, k, v, padding)
    result = rewrite_attention(gm, mask_options())
    graph = result.graph_module.graph
    (call,) = [n for n in graph.nodes if n.target is KEY_PADDING]
    ops = [n for n in graph.nodes if n.target is SPARSE_ATTENTION]
    assert len(ops) == 2 and {op.args[10] for op in ops} == {call.args[0]}  # the row, as the op's mask
    assert all(op.kwargs["is_causal"] is True for op in ops)
    kv_range, kind = sorted(call.users, key=lambda n: n.args[1])  # getitem 0 and 1
    assert {op.kwargs["kv_range"] for op in ops} == {kv_range} and {op.kwargs["padding_kind"] for op in ops} == {kind}
    assert result.replaced[0].padding is result.replaced[1].padding
    (out,) = run_graph(result.graph_module, q=q, k=k, v=v, padding=padding)
    assert rel_err(out, two_layers(q, k, v, padding)) < 1e-5
