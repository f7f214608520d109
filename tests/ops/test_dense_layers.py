"""``dense_layers``: the first layers run dense at every length, say so in the reports, and everything else
(later layers, the eager oracle, the run-time counts, the fidelity bench's density) sees the same split."""

import warnings

import pytest
import torch

import dam_compile
from dam_compile.config import DAMConfig
from dam_compile.kernels.constants import ALWAYS_DENSE
from dam_compile.ops.dispatch import DenseAttentionWarning, choose_path
from dam_compile.ops.attention import sparse_attention
from dam_compile.plan.plan_stats import PlanStats
from dam_compile.plan.structured_plans import streaming_plan
from dam_compile.ops.dense_layers import dense_layer_reason, layer_index
from dam_compile.reference_mode import SparseReferenceMode

from dam_testing import CPU_SPARSE, rel_err
from hf_models import ALL_MODELS, LAYERS, build, ids_for, main_output

# The default dense_layers (1), streaming plans that change the answer in every sparse layer.
STREAMING = {k: v for k, v in CPU_SPARSE.items() if k != "dense_layers"} | {
    "mask_source": "streaming", "sink_blocks": 1, "local_blocks": 1}


@pytest.mark.parametrize("path, index", [
    ("model.layers.0.self_attn", 0),
    ("model.layers.13.self_attn", 13),
    ("transformer.h.3.attn", 3),
    ("bert.encoder.layer.2.attention.self", 2),
    ("blocks.4.heads.1.attn", 4),  # nested lists: the outer one is the layer
    ("layers10.attn", None),  # digits inside a name are no step
    ("self_attn", None),
    ("", None),
])
def test_layer_index_is_the_first_integer_step(path, index):
    assert layer_index(path) == index


def test_reason_names_the_layer_and_the_option():
    assert dense_layer_reason("model.layers.1.self_attn", 1) is None
    assert dense_layer_reason("self_attn", 4) is None
    assert dense_layer_reason("model.layers.1.self_attn", 0) is None
    reason = dense_layer_reason("model.layers.1.self_attn", 2)
    assert "layer 1" in reason and "dense_layers=2" in reason


def test_always_dense_runs_sdpa_without_a_dense_warning():
    """The op of a kept-dense site takes its dense path, which is SDPA itself, and does not warn: the dense run
    is what was asked for."""
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    path, reason = choose_path(q, k, ALWAYS_DENSE, "reference")
    assert path == "dense" and "dense_layers" in reason
    with warnings.catch_warnings():
        warnings.simplefilter("error", DenseAttentionWarning)
        out = sparse_attention(q, k, v, streaming_plan(64, 64, 16, True, sink_blocks=1, local_blocks=1),
                               is_causal=True, min_seq_len=ALWAYS_DENSE, kernel="reference")
    expected = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    assert rel_err(out, expected) < 1e-5


@pytest.mark.parametrize("value", [-1, 1.5, True, "1"])
def test_bad_dense_layers_raise_naming_the_option(value):
    with pytest.raises(ValueError, match="dense_layers"):
        DAMConfig(dense_layers=value)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_first_layer_dense_the_others_sparse_as_the_oracle_says(name):
    """Layer 0 keeps full attention, layer 1 its streaming plan: the output equals the eager oracle run with
    the same options and the model (which knows the layers), and differs from the all-sparse one."""
    model, x = build(name), ids_for(name, n=64)
    with torch.no_grad():
        out = main_output(torch.compile(model, backend="dam", options=STREAMING)(x))
        sites = [s for r in dam_compile.graph_reports() for s in r.sites]
        with SparseReferenceMode(STREAMING, model):
            expected = main_output(model(x))
        with SparseReferenceMode({**STREAMING, "dense_layers": 0}):
            all_sparse = main_output(model(x))
    assert rel_err(out, expected) < 1e-5
    assert rel_err(out, all_sparse) > 1e-3
    assert [(s.decision, s.mask_source) for s in sites] == [("dense", None), ("sparse", "streaming")]
    assert "layer 0" in sites[0].reason and "dense_layers=1" in sites[0].reason


@pytest.mark.slow
def test_dense_layer_calls_count_as_full_density_through_generate():
    """The op still runs for the dense layer's prefill (its SDPA path), so a benchmark's measured density counts
    it at 1.0; its decode steps are decided when compiled and stay the model's SDPA call: only the sparse
    layer's steps reach the op."""
    model, x = build("llama"), ids_for("llama", n=64)
    model.forward = torch.compile(model.forward, backend="dam", options={**STREAMING, "dense_layers": 1})
    dam_compile.reset_runtime_stats()
    with torch.no_grad(), PlanStats() as stats:
        model.generate(x, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert len(stats.prefill) == LAYERS and len(stats.decode) == (LAYERS - 1) * 2
    assert stats.prefill[0] == 1.0 and stats.prefill[1] < 1.0
    assert all(d < 1.0 for d in stats.decode)
    counts = dam_compile.runtime_stats()
    assert counts["dense: the site's layer is kept dense (dense_layers)"] == 1
    decode = [r for r in dam_compile.graph_reports() if r.sites and r.sites[0].query.endswith(", 1, 16]")]
    assert decode and all(r.sites[0].decision == "dense" and "decided when compiled" in r.sites[0].reason
                          for r in decode)


def test_oracle_without_the_model_refuses_dense_layers():
    with pytest.raises(ValueError, match="model"):
        SparseReferenceMode(STREAMING)
    SparseReferenceMode({**STREAMING, "dense_layers": 0})  # every layer sparse: no model needed
