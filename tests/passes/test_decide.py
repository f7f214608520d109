"""Step (b), ``passes/decide``: whether the sparse op can stand in for a site exactly; every refusal says why (the
reports and the all-dense warning show it), and the scale reaches the ops as a float, ``None`` or a symbol."""

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from dam_compile.kernels.constants import MAX_HEAD_DIM
from dam_compile.passes import decide
from dam_compile.passes.decide import example_value, op_scale
from dam_compile.passes.find_sdpa import find_sdpa_sites

from dam_testing import meta, sdpa_graph


@pytest.mark.parametrize(
    "build, reason",
    [
        (lambda: sdpa_graph(dropout_p=0.1), "dropout_p=0.1"),
        (lambda: sdpa_graph(q=meta(1, 4, 64, 16, requires_grad=True)), "require grad"),
        (lambda: sdpa_graph(q=meta(1, 4, 64, 16, dtype=torch.float64), k=meta(1, 4, 64, 16, dtype=torch.float64), v=meta(1, 4, 64, 16, dtype=torch.float64)), "dtype torch.float64"),
        (lambda: sdpa_graph(q=meta(1, 4, 64, 512), k=meta(1, 4, 64, 512), v=meta(1, 4, 64, 512)), "head dim 512"),
        (lambda: sdpa_graph(v=meta(1, 4, 64, 32)), "head dims differ"),
        (lambda: sdpa_graph(q=meta(4, 64, 16), k=meta(4, 64, 16), v=meta(4, 64, 16)), "not 4-D"),
        (lambda: sdpa_graph(k=meta(1, 2, 64, 16), v=meta(1, 2, 64, 16)), "enable_gqa=False"),
        (lambda: sdpa_graph(k=meta(1, 3, 64, 16), v=meta(1, 3, 64, 16), enable_gqa=True), "4 query heads with 3"),
        (lambda: sdpa_graph(mask=meta(1, 1, 64, 64, dtype=torch.int32)), "attn_mask dtype torch.int32"),
        (lambda: sdpa_graph(mask=meta(1, 1, 64, 64, dtype=torch.float16)), "attn_mask dtype torch.float16"),
        (lambda: sdpa_graph(mask=meta(64, 64, dtype=torch.bool), is_causal=True), "is_causal=True"),
        (lambda: sdpa_graph(mask=meta(1, 1, 64, 64, requires_grad=True)), "attn_mask requires grad"),
    ],
)
def test_decide_refuses_with_reason(build, reason):
    (site,) = find_sdpa_sites(build())
    decision = decide(site)
    assert not decision.rewrite and reason in decision.reason


@pytest.mark.parametrize(
    "build",
    [
        lambda: sdpa_graph(is_causal=True),
        lambda: sdpa_graph(k=meta(1, 2, 64, 16), v=meta(1, 2, 64, 16), enable_gqa=True, scale=0.2),
        lambda: sdpa_graph(mask=meta(64, 64, dtype=torch.bool)),
        lambda: sdpa_graph(mask=meta(1, 4, 64, 64)),
        lambda: sdpa_graph(q=meta(1, 4, 64, 16, dtype=torch.bfloat16), k=meta(1, 4, 80, 16, dtype=torch.bfloat16), v=meta(1, 4, 80, 16, dtype=torch.bfloat16)),
    ],
)
def test_decide_accepts_supported_calls(build):
    (site,) = find_sdpa_sites(build())
    assert decide(site).rewrite


def graph_input(graph, name, value):
    """A new placeholder of ``graph`` standing for ``value``, before its first node."""
    with graph.inserting_before(next(iter(graph.nodes))):
        node = graph.placeholder(name)
    node.meta["example_value"] = value
    return node


@pytest.mark.parametrize("argument, reason", [
    ("dropout_p", "dropout_p is not a constant"),
    ("is_causal", "is_causal is not a constant"),
    ("enable_gqa", "enable_gqa is not a constant"),
    ("scale", "scale is Tensor"),
])
def test_a_flag_only_known_at_run_time_is_refused(argument, reason):
    """A graph input (here a tensor) where SDPA takes a constant: the op's flags are fixed when it is compiled."""
    g = sdpa_graph()
    node = next(n for n in g.nodes if n.op == "call_function")
    node.update_kwarg(argument, graph_input(g, argument, meta()))
    (site,) = find_sdpa_sites(g)
    decision = decide(site)
    assert not decision.rewrite and decision.reason.startswith(reason)


@pytest.mark.parametrize("build, reason", [
    (lambda: sdpa_graph(k=meta(1, 2, 64, 16), v=meta(1, 4, 64, 16), enable_gqa=True), "key has 2 heads, value 4"),
    (lambda: sdpa_graph(k=meta(2, 4, 64, 16), v=meta(2, 4, 64, 16)), "batch sizes may differ (query 1, key 2"),
    (lambda: sdpa_graph(q=meta(1, 4, 1, 16), is_causal=True), "one query row with is_causal=True"),
    (lambda: sdpa_graph(mask=meta(64, dtype=torch.bool)), "attn_mask is 1-D"),
    (lambda: sdpa_graph(mask=meta(1, 1, 1, 64, 64, dtype=torch.bool)), "attn_mask is 5-D"),
    (lambda: sdpa_graph(q=meta(1, 4, 64, MAX_HEAD_DIM + 8), k=meta(1, 4, 64, MAX_HEAD_DIM + 8),
                        v=meta(1, 4, 64, MAX_HEAD_DIM + 8)), f"> {MAX_HEAD_DIM}"),
    (lambda: sdpa_graph(q=meta(1, 4, 64, 16, dtype=torch.float16)), "dtype torch.float16/torch.float32"),
])
def test_shapes_the_sparse_op_cannot_compute_exactly_are_refused(build, reason):
    (site,) = find_sdpa_sites(build())
    decision = decide(site)
    assert not decision.rewrite and reason in decision.reason


def test_a_one_row_query_without_is_causal_is_a_decode_step_and_accepted():
    (site,) = find_sdpa_sites(sdpa_graph(q=meta(1, 4, 1, 16)))
    assert decide(site).rewrite


def test_a_graph_without_fake_values_is_refused():
    """``symbolic_trace`` records no shapes: the pass cannot check the call, so it leaves it."""

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    (site,) = find_sdpa_sites(torch.fx.symbolic_trace(Attention()).graph)
    assert example_value(site.query) is None
    decision = decide(site)
    assert not decision.rewrite and decision.reason == "no shape information for query/key/value"


def test_symbolic_head_counts_are_refused():
    """``dynamic=True`` makes every size symbolic, the head count too: the op's head layout is fixed per graph."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(lambda q: F.scaled_dot_product_attention(q, q, q), backend=capture, dynamic=True)(
        torch.randn(1, 2, 32, 16))
    (site,) = find_sdpa_sites(graphs[0].graph)
    decision = decide(site)
    assert not decision.rewrite and decision.reason == "symbolic head count or head dim"


def test_the_scale_goes_to_the_ops_as_a_float_none_or_its_symbol():
    (site,) = find_sdpa_sites(sdpa_graph(scale=1))
    assert op_scale(site) == 1.0 and isinstance(op_scale(site), float)
    (site,) = find_sdpa_sites(sdpa_graph())
    assert op_scale(site) is None

    g = sdpa_graph()  # a module's float attribute under dynamic=True: a graph input holding a SymFloat
    node = next(n for n in g.nodes if n.op == "call_function")
    scale = graph_input(g, "scale", ShapeEnv().create_unbacked_symfloat())
    node.update_kwarg("scale", scale)
    (site,) = find_sdpa_sites(g)
    assert decide(site).rewrite and op_scale(site) is scale
