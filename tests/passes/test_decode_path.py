"""``passes/decode_path``: a decode step (one query row) whose every call this graph can see runs dense keeps the
model's SDPA call, decided when the graph compiles; with a symbolic KV length that decision is a size guard."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dam_compile.passes.decide import example_value
from dam_compile.passes.decode_path import dense_decode_reason
from dam_compile.passes.find_sdpa import find_sdpa_sites

from dam_testing import capture_graph, mask_options, meta, sdpa_graph

STAYS = "decided when compiled, so the model's own SDPA call stays"


def site_of(q_len, kv_len=64, module_path=""):
    (site,) = find_sdpa_sites(sdpa_graph(q=meta(1, 4, q_len, 16), k=meta(1, 4, kv_len, 16), v=meta(1, 4, kv_len, 16)))
    return dataclasses.replace(site, module_path=module_path)


@pytest.mark.parametrize("options, why", [
    (mask_options(min_seq_len=1000), "decode step: KV cache shorter than min_seq_len=1000"),
    (mask_options(kernel="auto", min_seq_len=16), "CPU tensors: the fused sparse kernel needs CUDA"),
])
def test_a_decode_step_that_always_runs_dense_keeps_sdpa_and_says_why(options, why):
    reason = dense_decode_reason(site_of(1), options)
    assert reason is not None and reason.startswith(why) and STAYS in reason


def test_a_decode_step_in_a_dense_layer_keeps_sdpa():
    options = mask_options(dense_layers=2)
    reason = dense_decode_reason(site_of(1, module_path="model.layers.1.self_attn"), options)
    assert reason is not None and reason.startswith("layer 1 is one of the first dense_layers=2")
    assert dense_decode_reason(site_of(1, module_path="model.layers.2.self_attn"), options) is None


def test_a_decode_step_that_runs_sparse_goes_through_the_op():
    assert dense_decode_reason(site_of(1, kv_len=64), mask_options(min_seq_len=64)) is None


def test_prefill_keeps_its_run_time_choice():
    """However short, a prefill site is decided per call by the op: its host time hides behind the GPU work."""
    assert dense_decode_reason(site_of(64), mask_options(min_seq_len=1000)) is None
    assert dense_decode_reason(site_of(2, kv_len=2), mask_options(min_seq_len=1000)) is None


def test_a_symbolic_kv_length_is_decided_with_a_guard():
    """One graph serves every cache shorter than ``min_seq_len``; the guard makes a longer one compile again."""
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 64, 16)
    torch._dynamo.mark_dynamic(k, 2)
    (gm,) = capture_graph(lambda q, k: F.scaled_dot_product_attention(q, k, k), q, k)
    (site,) = find_sdpa_sites(gm.graph)
    length = example_value(site.key).shape[-2]
    assert isinstance(length, torch.SymInt)
    shape_env = length.node.shape_env
    before = {str(g.expr) for g in shape_env.guards}
    assert dense_decode_reason(site, mask_options(min_seq_len=1000)) is not None
    assert {str(g.expr) for g in shape_env.guards} - before == {f"{length.node.expr} < 1000"}
