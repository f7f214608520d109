"""``passes/pipeline``: the whole rewrite on a copy of the graph (the caller's graph module is never modified), a
``SiteReport`` per attention site saying what was done and why, and the backend's fallback when a pass fails."""

import operator

import pytest
import torch
import torch.nn.functional as F

import dam_compile
from dam_compile.config import DAMConfig
from dam_compile.kernels.constants import ALWAYS_DENSE
from dam_compile.passes import pipeline
from dam_compile.passes.find_sdpa import find_sdpa_sites
from dam_compile.passes.pipeline import NO_PROFILE_ENTRY, SiteReport, copy_graph_module, rewrite_attention
from dam_compile.passes.plan_call import PATTERN_PLAN
from dam_compile.passes.profile_protocol import ProfileMismatchError
from dam_compile.passes.rewrite import SPARSE_ATTENTION

from dam_testing import (
    CPU_SPARSE, AttentionBlock, AttentionLayers, attention_block_graph, capture_graph, mask_options,
    one_module_profile, rel_err, sdpa,
)

OPTIONS = mask_options()


def test_rewrite_replaces_only_the_attention_node():
    gm = attention_block_graph()
    before = gm.code
    result = rewrite_attention(gm, OPTIONS)
    assert gm.code == before, "the caller's graph module was modified"
    ops = [n.target for n in result.graph_module.graph.nodes if n.op == "call_function"]
    assert SPARSE_ATTENTION in ops and not find_sdpa_sites(result.graph_module.graph)
    assert ops.count(torch.ops.dam.dense_plan.default) == 1 and ops.count(operator.getitem) == 4
    assert [s.decision for s in result.sites] == ["sparse"]


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


def layers_graph(layers=2, q_len=40, kv_len=40, dynamic=False):
    """The graph of :class:`AttentionLayers`; ``dynamic``: with symbolic lengths (one query row stays static)."""
    q, k, v = torch.randn(1, 4, q_len, 16), torch.randn(1, 4, kv_len, 16), torch.randn(1, 4, kv_len, 16)
    for t in (q, k, v) if dynamic else ():
        if t.shape[2] > 1:
            torch._dynamo.mark_dynamic(t, 2)
    (gm,) = capture_graph(AttentionLayers(layers, is_causal=q_len > 1), q, k, v)
    return gm


def graph_snapshot(gm):
    return [(n.name, n.op, n.target, n.args, n.kwargs) for n in gm.graph.nodes]


def test_a_report_per_site_in_graph_order():
    result = rewrite_attention(layers_graph(), OPTIONS)
    assert all(isinstance(r, SiteReport) for r in result.sites)
    first, second = result.sites
    assert (first.module_path, second.module_path) == ("layers.0.self_attn", "layers.1.self_attn")
    assert first.as_dict() == dict(
        node=first.node, module_path="layers.0.self_attn", source=first.source, query="float32[1, 4, 40, 16]",
        key="float32[1, 4, 40, 16]", value="float32[1, 4, 40, 16]", dtype="float32", attn_mask="None",
        is_causal=True, dropout_p=0.0, scale=None, enable_gqa=False, decision="sparse",
        reason="eligible: sparse or dense is chosen per call at run time", mask_source="dense",
        reaches_min_seq_len=True, dynamic_heads=None)
    assert first.source.endswith("in forward") and [s.name for s in result.replaced] == [first.node, second.node]


def test_a_refused_site_keeps_sdpa_and_the_others_are_rewritten():
    def f(q, k, v):
        return sdpa(q, k, v, dropout_p=0.5) + sdpa(q, k, v, is_causal=True)

    (gm,) = capture_graph(f, *(torch.randn(1, 2, 40, 16) for _ in range(3)))
    result = rewrite_attention(gm, OPTIONS)
    refused, rewritten = result.sites
    assert (refused.decision, refused.mask_source, refused.dropout_p) == ("dense", None, 0.5)
    assert refused.reason.startswith("dropout_p=0.5")
    assert rewritten.decision == "sparse" and [s.name for s in result.replaced] == [rewritten.node]
    (kept,) = find_sdpa_sites(result.graph_module.graph)
    assert kept.node.name == refused.node and kept.dropout_p == 0.5


def test_the_callers_graph_module_is_left_as_it_was():
    """Not its nodes, not its buffers, not the parameter sources AOTAutograd reads: the calibrated patterns become
    buffers (with sources) of the copy only."""
    gm = layers_graph()
    before, sources, meta = graph_snapshot(gm), dict(gm._param_name_to_source), dict(gm.meta)
    profile, _ = one_module_profile(entry="layers.1.self_attn")
    result = rewrite_attention(gm, mask_options("calibrated"), profile)
    assert graph_snapshot(gm) == before and gm._param_name_to_source == sources and gm.meta == meta
    assert not list(gm.named_buffers()) and not hasattr(gm, "_dam_layers_1_self_attn_diagonals")
    new_gm = result.graph_module
    assert new_gm is not gm and new_gm.meta == meta  # Dynamo's compile id and sources travel with the copy
    new_buffers = {name for name, _ in new_gm.named_buffers()}
    assert {"_dam_layers_1_self_attn_diagonals", "_dam_layers_1_self_attn_corner"} <= new_buffers
    assert "_dam_layers_1_self_attn_diagonals" in new_gm._param_name_to_source


def test_copy_graph_module_maps_every_node_and_shares_the_modules():
    traced = torch.fx.symbolic_trace(AttentionBlock())  # parameters as submodules, read by get_attr/call_module
    copy, val_map = copy_graph_module(traced)
    assert list(val_map) == list(traced.graph.nodes) and list(val_map.values()) == list(copy.graph.nodes)
    assert copy.code == traced.code and copy.proj is traced.proj  # nothing is duplicated in memory

    gm = attention_block_graph()
    copy, _ = copy_graph_module(gm)
    assert copy._param_name_to_source == gm._param_name_to_source
    assert copy._param_name_to_source is not gm._param_name_to_source  # the pass adds its own buffers to it


def test_calibrated_sites_without_a_profile_entry_stay_dense():
    profile, _ = one_module_profile(entry="layers.1.self_attn")
    result = rewrite_attention(layers_graph(), mask_options("calibrated"), profile)
    missing, found = result.sites
    assert missing.decision == "dense" and missing.reason == f"{NO_PROFILE_ENTRY} 'layers.0.self_attn'"
    assert (found.decision, found.mask_source, found.dynamic_heads) == ("sparse", "calibrated", [])
    (site,) = result.replaced
    assert site.plan.target is PATTERN_PLAN and site.name == found.node


def test_a_profile_of_another_model_is_refused():
    profile, _ = one_module_profile(entry="model.layers.1.self_attn")
    with pytest.raises(ProfileMismatchError, match="match none of this graph's attention modules"):
        rewrite_attention(layers_graph(), mask_options("calibrated"), profile)


def test_the_options_must_be_mask_options_with_a_profile_for_calibrated():
    gm = layers_graph()
    with pytest.raises(TypeError, match="MaskOptions"):
        rewrite_attention(gm, DAMConfig(**CPU_SPARSE))
    with pytest.raises(ValueError, match="needs the calibrated profile"):
        rewrite_attention(gm, mask_options("calibrated"))


def test_dense_layers_stay_rewritten_but_always_dense():
    """Their calls are still counted and checked like the others': the op runs its dense path (SDPA)."""
    result = rewrite_attention(layers_graph(), mask_options(dense_layers=1))
    dense, sparse = result.sites
    assert (dense.decision, dense.mask_source, dense.reaches_min_seq_len) == ("dense", None, False)
    assert dense.reason.startswith("layer 0 is one of the first dense_layers=1")
    assert sparse.decision == "sparse"
    ops = [site.op for site in result.replaced]
    assert [op.kwargs["min_seq_len"] for op in ops] == [ALWAYS_DENSE, 0]
    assert [site.plan.kwargs["min_seq_len"] for site in result.replaced] == [ALWAYS_DENSE, 0]


def test_a_decode_step_that_always_runs_dense_keeps_the_models_sdpa():
    result = rewrite_attention(layers_graph(q_len=1, kv_len=64), mask_options(min_seq_len=1000))
    assert result.replaced == [] and len(find_sdpa_sites(result.graph_module.graph)) == 2
    assert all(r.decision == "dense" and "decided when compiled" in r.reason for r in result.sites)
    assert not any(r.reaches_min_seq_len for r in result.sites)  # 64 keys never reach 1000: nothing missed


def test_a_prefill_too_short_for_min_seq_len_is_reported_as_not_reaching_it():
    result = rewrite_attention(layers_graph(), mask_options(min_seq_len=1000))
    assert [(r.decision, r.reaches_min_seq_len) for r in result.sites] == [("sparse", False)] * 2
    assert len(result.replaced) == 2  # the op still decides per call


def test_a_symbolic_key_length_reaches_min_seq_len_unless_a_guard_bounds_it():
    """A prefill graph serves every length; a dense decode graph is guarded below min_seq_len (a longer cache
    compiles a sparse one), so its dense calls miss nothing."""
    options = mask_options(min_seq_len=1000)
    prefill = rewrite_attention(layers_graph(dynamic=True), options)
    assert [(r.decision, r.reaches_min_seq_len) for r in prefill.sites] == [("sparse", True)] * 2
    decode = rewrite_attention(layers_graph(q_len=1, kv_len=64, dynamic=True), options)
    assert [(r.decision, r.reaches_min_seq_len) for r in decode.sites] == [("dense", False)] * 2


def test_an_attention_feeding_the_next_one_directly_keeps_the_graph_whole():
    """Each site is read when its turn comes, so the second one never holds the first's erased SDPA node (it
    used to break the graph: "used before it has been defined", and the whole graph ran unmodified). The first
    is rewritten; the second, whose query is now our op's output (no example value), stays SDPA with a reason."""

    def f(q, k, v):
        return F.scaled_dot_product_attention(F.scaled_dot_product_attention(q, k, v), k, v)

    q, k, v = (torch.randn(1, 2, 32, 16) for _ in range(3))
    (gm,) = capture_graph(f, q, k, v)
    result = rewrite_attention(gm, OPTIONS)
    assert len(result.replaced) == 1
    assert [r.decision for r in result.sites] == ["sparse", "dense"]
    assert "no shape information" in result.sites[1].reason
    assert rel_err(result.graph_module(q, k, v)[0], f(q, k, v)) < 1e-5
