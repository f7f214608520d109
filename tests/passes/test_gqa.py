"""``passes/gqa``: the rewrite reads grouped K/V before HuggingFace's ``repeat_kv`` (query head ``h`` reads source
head ``h // rep``, the op's own GQA rule), so the copy of the KV cache loses its user; any other repeat is kept."""

import pytest
import torch
import torch.nn.functional as F

from dam_compile.passes.find_sdpa import find_sdpa_sites
from dam_compile.passes.gqa import read_before_repeat, repeated_source
from dam_compile.passes.pipeline import rewrite_attention
from dam_compile.passes.rewrite import SPARSE_ATTENTION

from dam_testing import capture_graph, mask_options, rel_err, run_graph


def repeat_kv(x, rep):
    """HuggingFace's ``repeat_kv``: each head ``rep`` times in a row."""
    b, h, n, d = x.shape
    return x[:, :, None, :, :].expand(b, h, rep, n, d).reshape(b, h * rep, n, d)


def tile(x, rep):
    """The heads ``rep`` times over, one after another: query head ``h`` reads source head ``h % kvh``."""
    b, h, n, d = x.shape
    return x[:, None, :, :, :].expand(b, rep, h, n, d).reshape(b, rep * h, n, d)


def inputs(kv_heads=2, value_heads=None):
    return (torch.randn(1, 4, 32, 16), torch.randn(1, kv_heads, 32, 16),
            torch.randn(1, kv_heads if value_heads is None else value_heads, 32, 16))


def site_of(f, *args):
    (gm,) = capture_graph(f, *args)
    (site,) = find_sdpa_sites(gm.graph)
    return gm, site


def placeholder(gm, name):
    return next(n for n in gm.graph.nodes if n.op == "placeholder" and n.target == f"L_{name}_")


def test_key_and_value_are_read_before_repeat_kv_as_grouped_heads():
    gm, site = site_of(lambda q, k, v: F.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2)), *inputs())
    assert repeated_source(site.key) == (placeholder(gm, "k"), 2)
    grouped = read_before_repeat(site)
    assert grouped.key is placeholder(gm, "k") and grouped.value is placeholder(gm, "v") and grouped.enable_gqa is True
    assert grouped.query is site.query and grouped.node is site.node and site.enable_gqa is False  # a new site


@pytest.mark.parametrize("f, args", [
    # tiled heads are another head map than the op's h // rep
    (lambda q, k, v: F.scaled_dot_product_attention(q, tile(k, 2), tile(v, 2)), inputs()),
    # only the key is repeat_kv's
    (lambda q, k, v: F.scaled_dot_product_attention(q, repeat_kv(k, 2), v.repeat_interleave(2, dim=1)), inputs()),
    # key and value repeated differently (2 -> 4 and 1 -> 4 heads)
    (lambda q, k, v: F.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 4)), inputs(2, 1)),
    # a repeat merged into the length axis, not the heads
    (lambda q, k, v: F.scaled_dot_product_attention(
        q, *(x[:, :, None].expand(1, 4, 2, 32, 16).reshape(1, 4, 64, 16) for x in (k, v))), inputs(4)),
    # already grouped
    (lambda q, k, v: F.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), enable_gqa=True), inputs()),
], ids=["tiled heads", "only the key", "other repeats", "length axis", "already grouped"])
def test_any_other_repeat_is_kept(f, args):
    _, site = site_of(f, *args)
    assert read_before_repeat(site) is site


def test_the_rewritten_op_reads_the_grouped_cache_and_computes_the_model():
    def f(q, k, v):
        return F.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), is_causal=True)

    q, k, v = inputs()
    (gm,) = capture_graph(f, q, k, v)
    result = rewrite_attention(gm, mask_options())
    (report,) = result.sites
    assert report.decision == "sparse" and "reads K/V before repeat_kv" in report.reason
    (op,) = [n for n in result.graph_module.graph.nodes if n.target is SPARSE_ATTENTION]
    assert [a.target for a in op.args[1:3]] == ["L_k_", "L_v_"] and op.kwargs["enable_gqa"] is True
    (out,) = run_graph(result.graph_module, q=q, k=k, v=v)
    assert rel_err(out, f(q, k, v)) < 1e-5
