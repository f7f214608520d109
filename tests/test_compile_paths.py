"""Every way a user compiles a model reaches the sparse op, and names its attention modules as the model does:
``torch.compile(model)`` (static first call, ``dynamic=True``), ``model.forward = torch.compile(model.forward)``
(what ``generate()`` needs) and a compiled function that calls the model."""

import pytest
import torch

import dam_compile
from dam_compile.config import DAMConfig
from dam_compile.passes.pipeline import rewrite_attention

from dam_testing import CPU_SPARSE, rel_err
from hf_models import ALL_MODELS, LAYERS, build, ids_for, main_output


def compiled_module(model, **kw):
    return torch.compile(model, backend="dam", options=CPU_SPARSE, **kw)


def compiled_forward(model):
    model.forward = torch.compile(model.forward, backend="dam", options=CPU_SPARSE)
    return model


def compiled_function(model):
    return torch.compile(lambda ids: model(ids), backend="dam", options=CPU_SPARSE)


ENTRIES = {
    "static first call": compiled_module,
    "dynamic=True": lambda model: compiled_module(model, dynamic=True),
    "compiled forward": compiled_forward,
    "compiled function": compiled_function,
}


@pytest.mark.parametrize("entry", list(ENTRIES))
@pytest.mark.parametrize("name", list(ALL_MODELS))
@pytest.mark.slow
def test_every_compile_path_runs_sparse_under_the_models_own_module_names(name, entry):
    model = build(name)
    modules = dict(model.named_modules())
    x = ids_for(name, n=40)
    with torch.no_grad():
        eager = main_output(model(x))
        out = main_output(ENTRIES[entry](model)(x))
    assert rel_err(out, eager) < 1e-5
    sites = [s for g in dam_compile.graph_reports() for s in g.sites]
    assert sites and all(s.decision == "sparse" for s in sites), [(s.module_path, s.reason) for s in sites]
    paths = {s.module_path for s in sites}
    assert len(paths) == LAYERS
    for path in paths:
        assert path in modules, f"{path!r} is not a name of {type(model).__name__}.named_modules()"
        assert "Attention" in type(modules[path]).__name__
    # The run itself took the sparse op's path at every site (the reference kernel on the CPU).
    assert dam_compile.runtime_stats() == {"reference: kernel='reference'": LAYERS}


def test_a_symbolic_scale_goes_to_the_op_as_it_is():
    """dynamic=True makes HF's float ``scaling`` a graph input: the SDPA scale is the node of its ``item()``, and
    the rewritten graph (run as it is, no AOTAutograd to specialise the float) computes the model at any length."""
    model = build("llama")
    results = []

    def rewrite_only(gm, example_inputs):
        results.append(rewrite_attention(gm, DAMConfig(**CPU_SPARSE).mask_options()))
        return results[-1].graph_module.forward

    run = torch.compile(model, backend=rewrite_only, dynamic=True)
    with torch.no_grad():
        for n in (40, 33, 57):
            ids = ids_for("llama", n=n)
            assert rel_err(run(ids).logits, model(ids).logits) < 1e-5
    (result,) = results  # one graph for every length
    assert len(result.sites) == LAYERS and all(s.decision == "sparse" for s in result.sites)
    ops = [n for n in result.graph_module.graph.nodes if n.target is torch.ops.dam.sparse_attention.default]
    assert len(ops) == LAYERS
    assert all(isinstance(op.args[11], torch.fx.Node) and op.args[11].target == "item" for op in ops)
    assert dam_compile.runtime_stats() == {"reference: kernel='reference'": 3 * LAYERS}


def test_one_loud_warning_when_a_long_input_runs_dense_at_run_time():
    """kernel='auto' has no sparse kernel for CPU tensors: the rewritten sites run dense, and the user is told
    once, however many sites and calls."""
    model = build("llama")
    run = torch.compile(model, backend="dam", options={**CPU_SPARSE, "kernel": "auto"})
    with pytest.warns(dam_compile.DenseAttentionWarning, match="CPU tensors") as caught, torch.no_grad():
        run(ids_for("llama", n=40))
        run(ids_for("llama", n=40))
    assert len([w for w in caught if issubclass(w.category, dam_compile.DenseAttentionWarning)]) == 1


def test_generate_prefill_runs_causal_at_every_prompt_length():
    """generate() always passes an attention_mask: each prompt length's prefill graph (static, then dynamic)
    reaches the op as is_causal, with at most the mask's key row, never the N x N mask."""
    model, eager = build("llama"), build("llama")
    model.forward = torch.compile(model.forward, backend="dam", options=CPU_SPARSE)
    kwargs = dict(max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        for n in (40, 57):
            ids = ids_for("llama", n=n)
            assert torch.equal(model.generate(ids, **kwargs), eager.generate(ids, **kwargs))
    prefill = [s for g in dam_compile.graph_reports() for s in g.sites if not s.query.endswith(", 1, 16]")]
    assert len(prefill) == 2 * LAYERS
    assert all(s.decision == "sparse" for s in prefill)
    assert all(s.attn_mask == "None" or "key padding vector" in s.reason for s in prefill), [s.reason for s in prefill]
