"""Each pass step alone: find, decide, insert + rewrite, verify, and the backend's fallback."""

import operator
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.fx import Graph, GraphModule

import dam_compile
from dam_compile.config import DAMConfig
from dam_compile.passes.rewrite import SPARSE_ATTENTION
from dam_compile.passes.verify import RewriteCheckError, check_rewrite
from dam_compile.passes import decide
from dam_compile.passes.find_sdpa import find_sdpa_sites, normalize_module_path
from dam_compile.passes.pipeline import rewrite_attention
from dam_compile.passes import pipeline

from dam_testing import CPU_SPARSE, capture_graph, sdpa

CFG = DAMConfig(**{k: v for k, v in CPU_SPARSE.items()})


def meta(*shape, dtype=torch.float32, requires_grad=False):
    return torch.empty(shape, dtype=dtype, device="meta", requires_grad=requires_grad)


def sdpa_graph(target=F.scaled_dot_product_attention, q=None, k=None, v=None, mask=None, positional=False, **kwargs):
    """A hand-built graph ``out = target(q, k, v, ...)`` whose placeholders carry fake values."""
    g = Graph()
    values = {"q": q if q is not None else meta(1, 4, 64, 16), "k": k if k is not None else meta(1, 4, 64, 16),
              "v": v if v is not None else meta(1, 4, 64, 16)}
    if mask is not None:
        values["mask"] = mask
    nodes = {}
    for name, value in values.items():
        nodes[name] = g.placeholder(name)
        nodes[name].meta["example_value"] = value
    if mask is not None:
        kwargs["attn_mask"] = nodes["mask"]
    args = (nodes["q"], nodes["k"], nodes["v"])
    if positional:
        args = (*args, kwargs.pop("attn_mask", None), kwargs.pop("dropout_p", 0.0), kwargs.pop("is_causal", False))
    out = g.call_function(target, args, kwargs)
    g.output(out)
    return g


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


class AttentionBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, q, k, v):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out).relu() + 1


def block_graph():
    x = (torch.randn(1, 2, 40, 16) for _ in range(3))
    (gm,) = capture_graph(AttentionBlock().eval(), *x)
    return gm


def test_rewrite_replaces_only_the_attention_node():
    gm = block_graph()
    before = gm.code
    result = rewrite_attention(gm, CFG.mask_options())
    assert gm.code == before, "the caller's graph module was modified"
    ops = [n.target for n in result.graph_module.graph.nodes if n.op == "call_function"]
    assert SPARSE_ATTENTION in ops and not find_sdpa_sites(result.graph_module.graph)
    assert ops.count(torch.ops.dam.dense_plan.default) == 1 and ops.count(operator.getitem) == 4
    assert [s.decision for s in result.sites] == ["sparse"]


def _rewrite_with_record():
    gm = block_graph()
    result = rewrite_attention(gm, CFG.mask_options())
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


def test_pass_failure_falls_back_to_the_unmodified_graph(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(pipeline, "insert_mask_generation", broken)
    q = torch.randn(1, 2, 40, 16)
    with pytest.warns(UserWarning, match="boom"):
        out = torch.compile(sdpa, backend="dam", options=CPU_SPARSE)(q, q, q, is_causal=True)
    assert torch.allclose(out, sdpa(q, q, q, is_causal=True), atol=1e-6)
    assert "boom" in dam_compile.graph_reports()[-1].fallback

    torch._dynamo.reset()
    with pytest.raises(Exception, match="boom"):
        torch.compile(sdpa, backend="dam", options={**CPU_SPARSE, "strict": True})(q, q, q, is_causal=True)
