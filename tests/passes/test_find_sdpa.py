"""Step (a), ``passes/find_sdpa``: every SDPA call of a graph, whatever its form, with its arguments by name, the
module that made it (as the model's ``named_modules()`` spells it: the profile's key) and its source line."""

import pytest
import torch
import torch.nn.functional as F
from torch.fx import Graph

from dam_compile.passes.find_sdpa import bind_sdpa_args, find_sdpa_sites, is_sdpa, normalize_module_path

import dam_testing
from dam_testing import AttentionLayers, capture_graph, sdpa_graph


@pytest.mark.parametrize(
    "target", [F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default]
)
@pytest.mark.parametrize("positional", [False, True])
def test_find_sdpa_reads_arguments(target, positional):
    g = sdpa_graph(target, positional=positional, is_causal=True, dropout_p=0.0)
    (site,) = find_sdpa_sites(g)
    assert (site.query.name, site.key.name, site.value.name) == ("q", "k", "v")
    assert site.is_causal is True and site.dropout_p == 0.0 and site.attn_mask is None and site.scale is None


def test_find_sdpa_ignores_other_calls():
    g = Graph()
    x = g.placeholder("x")
    g.output(g.call_function(torch.softmax, (x, -1)))
    assert find_sdpa_sites(g) == []


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("L['self'].model.layers.3.self_attn", "model.layers.3.self_attn"),
        ("L['self'].layers[3]", "layers.3"),
        ("L['fn'].blocks['attn']", "blocks.attn"),
        ("model.layers.0.self_attn", "model.layers.0.self_attn"),
        ("L['args'][0].model.layers.0.self_attn", "model.layers.0.self_attn"),  # forward wrapped by *args
        ("G['model'].model.layers.1", "model.layers.1"),  # a function using a global model
        ("G['model']", ""),
        ("L['self']._modules['model']._modules['layers'][2]", "model.layers.2"),
        ("G['fn'].__self__.blocks[1]", "blocks.1"),  # a bound method's module
    ],
)
def test_normalize_module_path(raw, expected):
    assert normalize_module_path(raw) == expected


def test_every_argument_is_read_by_name_with_sdpas_defaults():
    """Positional and keyword arguments land on the same names; what the call leaves out is SDPA's default."""
    assert bind_sdpa_args(("q", "k", "v"), {}) == dict(query="q", key="k", value="v", attn_mask=None, dropout_p=0.0,
                                                       is_causal=False, scale=None, enable_gqa=False)
    bound = bind_sdpa_args(("q", "k", "v", "m", 0.5, True), {"scale": 0.1, "enable_gqa": True})
    assert (bound["attn_mask"], bound["dropout_p"], bound["is_causal"], bound["scale"], bound["enable_gqa"]) == (
        "m", 0.5, True, 0.1, True)


def test_a_method_or_other_function_named_like_sdpa_is_no_site():
    g = Graph()
    q = g.placeholder("q")
    method = g.call_method("scaled_dot_product_attention", (q, q, q))
    other = g.call_function(torch.matmul, (q, q))
    g.output((method, other))
    assert not is_sdpa(method) and not is_sdpa(other) and find_sdpa_sites(g) == []


def test_a_dynamo_graph_gives_every_site_in_order_with_its_module_path_and_source():
    model = AttentionLayers(3)
    (gm,) = capture_graph(model, *(torch.randn(1, 2, 32, 16) for _ in range(3)))
    sites = find_sdpa_sites(gm.graph)
    paths = [site.module_path for site in sites]
    assert paths == ["layers.0.self_attn", "layers.1.self_attn", "layers.2.self_attn"]
    assert set(paths) <= dict(model.named_modules()).keys()  # the names a profile is keyed by
    order = list(gm.graph.nodes)
    assert [order.index(s.node) for s in sites] == sorted(order.index(s.node) for s in sites)
    assert all(s.source.startswith(dam_testing.__file__) and s.source.endswith("in forward") for s in sites)
    assert all(s.is_causal is True for s in sites)


def test_a_function_compiled_on_its_own_has_no_module_path():
    (gm,) = capture_graph(lambda q: F.scaled_dot_product_attention(q, q, q), torch.randn(1, 2, 32, 16))
    (site,) = find_sdpa_sites(gm.graph)
    assert site.module_path == "" and site.query is site.key is site.value
