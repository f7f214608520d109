"""Tiny random-weight HuggingFace models through ``backend="dam"``: single sequence, padded batch,
``generate()`` with the KV cache, graph breaks, and the training (grad) fallback."""

import pytest
import torch

import dam_compile
from dam_compile.reference_mode import SparseReferenceMode

from dam_testing import CPU_SPARSE, rel_err
from hf_models import ALL_MODELS, CAUSAL_LMS, LAYERS, build, ids_for, main_output

STREAMING = {**CPU_SPARSE, "mask_source": "streaming", "sink_blocks": 1, "local_blocks": 2}


def ids(batch=1, n=70):
    return ids_for("x", batch, n)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_single_sequence(name):
    model, x = build(name), ids()
    with torch.no_grad():
        eager = main_output(model(x))
        out = main_output(torch.compile(model, backend="dam", options=CPU_SPARSE)(x))
        assert rel_err(out, eager) < 1e-5
        assert sum(r.rewritten for r in dam_compile.graph_reports()) == LAYERS
        assert dam_compile.runtime_stats() == {"reference: kernel='reference'": LAYERS}

        torch._dynamo.reset()
        out = main_output(torch.compile(model, backend="dam", options=STREAMING)(x))
        with SparseReferenceMode(STREAMING, model):
            expected = main_output(model(x))
    assert rel_err(out, expected) < 1e-5
    assert rel_err(out, eager) > 1e-3  # the sparse plan really changed the attention


@pytest.mark.parametrize("name", ALL_MODELS)
def test_padded_batch(name):
    model, x = build(name), ids(batch=3, n=50)
    attention_mask = torch.ones_like(x)
    attention_mask[0, :9] = 0  # left padding, as generate() pads
    attention_mask[2, :20] = 0
    if name == "bert":
        attention_mask = attention_mask.flip(-1)  # encoders pad on the right
    valid = attention_mask.bool()
    with torch.no_grad():
        eager = main_output(model(x, attention_mask=attention_mask))
        compiled = torch.compile(model, backend="dam", options=CPU_SPARSE)
        out = main_output(compiled(x, attention_mask=attention_mask))
    assert rel_err(out[valid], eager[valid]) < 1e-5
    sites = [s for r in dam_compile.graph_reports() for s in r.sites]
    assert [s.decision for s in sites] == ["sparse"] * LAYERS, [s.reason for s in sites]
    assert all(s.attn_mask != "None" for s in sites)


@pytest.mark.parametrize("name", CAUSAL_LMS)
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.slow
def test_generate_with_kv_cache(name, cache):
    """Greedy generate() through the compiled forward equals eager: the prefill and every decode step run the
    sparse path (the all-blocks plan), decode steps with their one-row plan."""
    model, x = build(name), ids(n=40)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation=cache)
    eager = model.generate(x, **kwargs)
    model.forward = torch.compile(model.forward, backend="dam", options=CPU_SPARSE)
    out = model.generate(x, **kwargs)
    assert torch.equal(out, eager)
    assert dam_compile.runtime_stats() == {"reference: kernel='reference'": LAYERS * 6}
    sites = [s for r in dam_compile.graph_reports() for s in r.sites]
    assert all(s.decision == "sparse" for s in sites), [s.reason for s in sites]
    assert any(s.query.endswith(", 1, 16]") for s in sites)  # a decode graph was rewritten too


def test_backend_adds_no_graph_breaks():
    model, x = build("llama"), ids()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(x)
        torch._dynamo.reset()
        dam_compile.clear_graph_reports()
        torch.compile(model, backend="dam", options=CPU_SPARSE)(x)
    assert len(dam_compile.graph_reports()) == explained.graph_count
    assert explained.graph_break_count == 0


def test_grad_enabled_stays_dense_and_exact():
    model, x = build("llama"), ids()
    eager = model(x).logits
    out = torch.compile(model, backend="dam", options=CPU_SPARSE)(x).logits
    assert rel_err(out, eager) < 1e-5
    sites = [s for r in dam_compile.graph_reports() for s in r.sites]
    assert sites and all(s.decision == "dense" and "require grad" in s.reason for s in sites)
    out.sum().backward()  # training still works: the graph kept SDPA
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


@pytest.mark.slow
def test_llama_through_inductor():
    model, x = build("llama"), ids()
    with torch.no_grad():
        eager = model(x).logits
        options = {**STREAMING, "inner_backend": "inductor"}
        out = torch.compile(model, backend="dam", options=options)(x).logits
        with SparseReferenceMode(options, model):
            expected = model(x).logits
    assert rel_err(out, expected) < 1e-5 and rel_err(out, eager) > 1e-3
