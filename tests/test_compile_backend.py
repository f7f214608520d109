"""The ``dam`` backend (compile_backend.py): it compiles a model with its attention rewritten and records a
``GraphReport`` per graph; a failing pass compiles the unmodified graph with a warning (``strict=True`` raises, a
wrong profile always does); the rewritten graph goes to ``inner_backend`` (``mode`` to Inductor); the backend is
found by name and takes bound options; its log and its one warning for a graph that stays dense."""

import importlib.metadata
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dam_compile
import dam_compile.compile_backend as compile_backend
from dam_compile.calibration.profile import DAMProfile
from dam_compile.compile_backend import compile_graph, graph_reports, inner_compile
from dam_compile.config import DAMConfig
from dam_compile.passes.profile_protocol import ProfileMismatchError
from dam_compile.plan.reference import block_sparse_attention_reference
from dam_compile.plan.structured_plans import streaming_plan

from dam_testing import CPU_SPARSE, dense_oracle, rel_err, sdpa
from planted_heads import PlantedModel, needle_samples

N = 40


class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(16, 16)

    def forward(self, x, k, v):
        return F.scaled_dot_product_attention(self.q_proj(x), k, v, is_causal=True, enable_gqa=True)


class TwoLayers(torch.nn.Module):
    """``layers.{0,1}.attn``, four query heads over two K/V heads; layer 1's query is a projection of layer 0's
    output (a query that is itself another SDPA call's output makes the pass fail today; the backend then falls
    back to the unmodified graph)."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.ModuleDict({"attn": Attention()}) for _ in range(2))

    def forward(self, x, k, v):
        for layer in self.layers:
            x = layer["attn"](x, k, v)
        return x


def qkv(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, n, 16, generator=g), torch.randn(1, 2, n, 16, generator=g),
            torch.randn(1, 2, n, 16, generator=g))


def causal(n=N):
    return torch.ones(n, n, dtype=torch.bool).tril()


def dense_model(model, x, k, v):
    """``model`` in float64 with full causal attention (dam_testing.dense_oracle)."""
    x = x.double()
    for layer in model.layers:
        proj = layer["attn"].q_proj
        x = dense_oracle(x @ proj.weight.double().T + proj.bias.double(), k, v, causal(x.shape[-2]))
    return x


def test_compiles_a_model_and_reports_each_graph():
    """Layer 0 kept dense (dense_layers=1), layer 1 rewritten; the output is float64 dense attention."""
    q, k, v = qkv()
    model = TwoLayers()
    with torch.no_grad():
        out = torch.compile(model, backend="dam", options={**CPU_SPARSE, "dense_layers": 1})(q, k, v)
    assert rel_err(out, dense_model(model, q, k, v)) < 1e-5
    (report,) = graph_reports()
    assert (report.rewritten, report.dense, report.fallback, report.dump_dir) == (1, 1, None, None)
    assert [(s.module_path, s.decision) for s in report.sites] == [("layers.0.attn", "dense"),
                                                                   ("layers.1.attn", "sparse")]
    assert report.pass_s > 0
    assert dam_compile.runtime_stats() == {"reference: kernel='reference'": 1,
                                           "dense: the site's layer is kept dense (dense_layers)": 1}
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend="dam", options=CPU_SPARSE)(*qkv(48))
    first, second = graph_reports()
    assert second.index == first.index + 1 and (second.rewritten, second.dense) == (2, 0)
    dam_compile.clear_graph_reports()
    assert graph_reports() == []


def failing_pass(error):
    def rewrite(*_args, **_kwargs):
        raise error

    return rewrite


def one_graph(n=N):
    """``TwoLayers``' Dynamo graph, its example inputs (parameters among them) and the model."""
    model, captured = TwoLayers(), []

    def capture(gm, example_inputs):
        captured.append((gm, example_inputs))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=capture)(*qkv(n))
    ((gm, example_inputs),) = captured
    torch._dynamo.reset()
    return gm, example_inputs, model


def test_a_failing_pass_compiles_the_unmodified_graph_with_a_warning(monkeypatch):
    gm, inputs, model = one_graph()
    monkeypatch.setattr(compile_backend, "rewrite_attention", failing_pass(RuntimeError("boom")))
    with torch.no_grad(), pytest.warns(UserWarning, match=r"attention pass failed, compiling the graph unmodified "
                                                         r"\(RuntimeError: boom"):
        compiled = compile_graph(gm, inputs, DAMConfig(**{**CPU_SPARSE, "inner_backend": "eager"}))
    (report,) = graph_reports()
    assert report.fallback == "RuntimeError: boom" and report.sites == [] and report.rewritten == 0
    with torch.no_grad():
        (out,) = compiled(*inputs)
    assert rel_err(out, dense_model(model, *qkv())) < 1e-5
    assert dam_compile.runtime_stats() == {}  # the model's own SDPA ran, not our op


def test_strict_raises_and_a_wrong_profile_always_raises(monkeypatch):
    gm, inputs, _ = one_graph()
    monkeypatch.setattr(compile_backend, "rewrite_attention", failing_pass(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        compile_graph(gm, inputs, DAMConfig(**CPU_SPARSE, strict=True))
    monkeypatch.setattr(compile_backend, "rewrite_attention", failing_pass(ProfileMismatchError("wrong profile")))
    with pytest.raises(ProfileMismatchError, match="wrong profile"):
        compile_graph(gm, inputs, DAMConfig(**CPU_SPARSE))  # not strict: still the user's to fix
    assert graph_reports() == []


def test_a_profile_with_other_head_counts_raises_at_compile():
    model = PlantedModel().eval()
    g = torch.Generator().manual_seed(0)
    wrong = DAMProfile.from_mean_attention({"attn": torch.rand(2, 8, 8, generator=g).tril()}, {"attn": True},
                                           box_cox_lambda=0.5, tau=0.3, mu=0.8, model_fingerprint="x", samples=1)
    options = {"kernel": "reference", "min_seq_len": 0, "block_size": 16, "inner_backend": "aot_eager",
               "profile": wrong}
    # Dynamo wraps the error; its text names it.
    with torch.no_grad(), pytest.raises(Exception, match="ProfileMismatchError: .* has 2 query heads"):
        torch.compile(model, backend="dam", options=options)(needle_samples(1, 40, after=8)[0])


@pytest.mark.parametrize("inner_backend", ["eager", "aot_eager"])
def test_the_rewritten_graph_goes_to_the_inner_backend(monkeypatch, inner_backend):
    seen = []
    lookup = torch._dynamo.lookup_backend

    def spy(name):
        compiler = lookup(name)

        def compile_(gm, example_inputs):
            seen.append((name, [n.target for n in gm.graph.nodes if n.op == "call_function"]))
            return compiler(gm, example_inputs)

        return compile_

    monkeypatch.setattr(torch._dynamo, "lookup_backend", spy)
    gm, inputs, model = one_graph()
    with torch.no_grad():  # as Dynamo compiles a call under no_grad
        compiled = compile_graph(gm, inputs, DAMConfig(**{**CPU_SPARSE, "inner_backend": inner_backend}))
        (out,) = compiled(*inputs)
    ((name, targets),) = seen
    assert name == inner_backend
    assert targets.count(torch.ops.dam.sparse_attention.default) == 2
    assert torch._C._nn.scaled_dot_product_attention not in targets
    assert rel_err(out, dense_model(model, *qkv())) < 1e-5
    assert dam_compile.runtime_stats() == {"reference: kernel='reference'": 2}


def test_mode_reaches_inductor_and_only_inductor(monkeypatch, caplog):
    import torch._inductor.compile_fx as inductor_compile

    seen = []

    def spy(gm, example_inputs, config_patches=None, **kwargs):
        seen.append(config_patches)
        return gm.forward

    monkeypatch.setattr(inductor_compile, "compile_fx", spy)
    q, k, v = qkv()
    torch.compile(sdpa, backend="dam", mode="max-autotune-no-cudagraphs")(q, k, v, is_causal=True, enable_gqa=True)
    assert seen == [torch._inductor.list_mode_options("max-autotune-no-cudagraphs")]
    assert seen[0]["max_autotune"] is True
    gm, inputs, _ = one_graph()
    inner_compile(gm, inputs, "inductor", None)
    assert seen[1] is None
    caplog.set_level(logging.WARNING, logger="dam_compile")
    inner_compile(gm, inputs, "eager", "reduce-overhead")
    assert any("mode='reduce-overhead' only applies with inner_backend='inductor'" in r.getMessage()
               for r in caplog.records)
    assert len(seen) == 2


def test_explicit_backend_callable_and_torch_compile_options_merge():
    q, k, v = qkv()
    bound = dam_compile.backend(**CPU_SPARSE)
    out = torch.compile(sdpa, backend=bound, options={"mask_source": "streaming", "local_blocks": 1})(
        q, k, v, is_causal=True, enable_gqa=True
    )
    expected = block_sparse_attention_reference(q, k, v, streaming_plan(N, N, 16, True, 1, 1), is_causal=True,
                                                enable_gqa=True)
    assert rel_err(out, expected) < 1e-6
    assert graph_reports()[-1].sites[0].mask_source == "streaming"


def test_entry_point_is_declared():
    eps = importlib.metadata.entry_points(group="torch_dynamo_backends")
    assert {ep.name: ep.value for ep in eps}["dam"] == "dam_compile.compile_backend:dam_backend"


@pytest.mark.slow
def test_backend_dam_resolves_without_import():
    """In a fresh interpreter, started in the source checkout when there is one (where Python sees the
    checkout's dam_compile/ folder before the installed package), as a user's script would be."""
    code = textwrap.dedent(
        """
        import sys, torch
        import torch.nn.functional as F
        f = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                          backend="dam", options={"inner_backend": "eager"})
        q = torch.randn(1, 2, 8, 16)
        assert torch.allclose(f(q, q, q), F.scaled_dot_product_attention(q, q, q, is_causal=True), atol=1e-6)
        assert "dam_compile" in sys.modules and "dam" in torch._dynamo.list_backends()
        import dam_compile
        assert dam_compile.graph_reports()[0].rewritten == 1
        print("resolved")
        """
    )
    root = Path(__file__).resolve().parents[1]
    cwd = root if (root / "pyproject.toml").exists() else None
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=cwd)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "resolved" in run.stdout


def test_one_info_line_per_graph_and_dense_reason_once(caplog, monkeypatch):
    monkeypatch.setattr(compile_backend, "_logged_reasons", set())  # forget what earlier tests logged
    caplog.set_level(logging.INFO, logger="dam_compile")
    for n in (40, 48):  # two compiles, same dense reason
        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(TwoLayers(), backend="dam", options={**CPU_SPARSE, "dense_layers": 1,
                                                               "inner_backend": "eager"})(*qkv(n))
    messages = [r.getMessage() for r in caplog.records if r.name == "dam_compile"]
    assert sum("2 attention site(s), 1 rewritten, 1 dense" in m for m in messages) == 2
    assert sum("layers.0.attn stays dense: layer 0 is one of the first dense_layers=1" in m for m in messages) == 1


def dense_warnings(record):
    return [w for w in record if issubclass(w.category, dam_compile.DenseAttentionWarning)]


def test_one_loud_warning_when_every_site_of_a_long_graph_stays_dense():
    """Grad keeps every site dense: compiled for 64 tokens with min_seq_len=32, the user is told once, with the
    reason, however many graphs."""
    options = {**CPU_SPARSE, "min_seq_len": 32, "inner_backend": "eager"}
    with pytest.warns(dam_compile.DenseAttentionWarning, match="every attention site.*require grad") as caught:
        for n in (64, 80):
            torch._dynamo.reset()
            q, k, v = (t.requires_grad_() for t in qkv(n))
            torch.compile(TwoLayers(), backend="dam", options=options)(q, k, v).sum().backward()
    assert len(dense_warnings(caught)) == 1
    assert all(r.rewritten == 0 for r in graph_reports())


def test_no_warning_below_min_seq_len_or_when_a_site_is_rewritten(recwarn):
    q, k, v = (t.requires_grad_() for t in qkv(64))
    torch.compile(TwoLayers(), backend="dam", options={**CPU_SPARSE, "min_seq_len": 128, "inner_backend": "eager"})(
        q, k, v)
    torch._dynamo.reset()
    with torch.no_grad():  # layer 0 dense, layer 1 rewritten: a speedup somewhere
        torch.compile(TwoLayers(), backend="dam", options={**CPU_SPARSE, "dense_layers": 1, "inner_backend": "eager"})(
            *qkv(64))
    assert not dense_warnings(recwarn)
