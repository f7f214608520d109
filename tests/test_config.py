import dataclasses
import importlib.metadata
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import dam_compile
from dam_compile import DAMConfig
from dam_compile.plan.structured_plans import streaming_plan
from dam_compile.plan.reference import block_sparse_attention_reference

from dam_testing import CPU_SPARSE, rel_err, sdpa


def test_defaults_are_documented_values():
    cfg = DAMConfig()
    assert (cfg.block_size, cfg.min_seq_len, cfg.source, cfg.kernel, cfg.inner_backend) == (
        128, 8192, "dynamic", "auto", "inductor"
    )
    assert (cfg.tau, cfg.box_cox_lambda, cfg.mu, cfg.sink_blocks, cfg.local_blocks, cfg.strict) == (
        0.3, 0.5, 0.8, 1, 2, False
    )
    assert (cfg.density, cfg.mass_target, cfg.estimator) == (None, 0.99, "sampled")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.block_size = 64


@pytest.mark.parametrize("estimator, cap, floor", [("sampled", 1.0, 0.0), ("adaptive", 0.075, 0.075),
                                                    ("pooled", 0.075, 0.075), ("last_block", 0.075, 0.075)])
def test_unset_density_is_the_estimators_and_a_set_one_applies_to_prefill_and_decode(estimator, cap, floor):
    """The default estimator's budgets follow the mass with no cap (a decode step keeps what holds 0.99 of its
    exact mass); the fixed-share estimators keep their earlier 0.075. A density the user sets is the prefill
    cap and the decode floor of every estimator."""
    options = DAMConfig(estimator=estimator).mask_options()
    assert (options.density, options.decode_density) == (cap, floor)
    assert options.decode_plan_kwargs(None)["density"] == floor
    assert options.dynamic_plan_kwargs(True, None)["density"] == cap
    options = DAMConfig(estimator=estimator, density=0.2).mask_options()
    assert (options.density, options.decode_density) == (0.2, 0.2)


def test_unknown_option_lists_valid_ones():
    with pytest.raises(ValueError, match=r"'block_sise'.*valid options: block_size, box_cox_lambda"):
        DAMConfig.from_options({"block_sise": 64})


@pytest.mark.parametrize(
    "name, value",
    [
        ("block_size", 100), ("block_size", 512), ("block_size", 8), ("block_size", True), ("min_seq_len", -1),
        ("mask_source", "magic"), ("kernel", "cuda"), ("inner_backend", "tvm"), ("strict", "yes"),
        ("tau", "high"), ("sink_blocks", -1), ("local_blocks", 0), ("dump_dir", 3), ("mu", 0.0),
        ("density", 1.5), ("mass_target", -0.1), ("estimator", "exact"), ("profile", 3),
        ("profile", "/no/such/profile.safetensors"), ("mask_source", "calibrated"),
    ],
)
def test_bad_values_name_the_option(name, value):
    with pytest.raises(ValueError, match=name):
        DAMConfig.from_options({name: value})
    with pytest.raises(ValueError, match=name):
        dam_compile.backend(**{name: value})


def test_dump_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DAM_DUMP_DIR", str(tmp_path))
    assert DAMConfig.from_options().dump_dir == str(tmp_path)
    assert DAMConfig.from_options({"dump_dir": "elsewhere"}).dump_dir == "elsewhere"
    monkeypatch.delenv("DAM_DUMP_DIR")
    assert DAMConfig.from_options().dump_dir is None


def test_bad_option_through_torch_compile_raises_naming_it():
    f = torch.compile(lambda x: x * 2, backend="dam", options={"block_sise": 64})
    with pytest.raises(Exception, match="block_sise"):
        f(torch.randn(4))


def _qkv(n=40, heads=4, kv_heads=2, dim=16):
    return torch.randn(1, heads, n, dim), torch.randn(1, kv_heads, n, dim), torch.randn(1, kv_heads, n, dim)


def test_options_reach_the_backend():
    q, k, v = _qkv()
    opts = {**CPU_SPARSE, "mask_source": "streaming", "sink_blocks": 1, "local_blocks": 1}
    out = torch.compile(sdpa, backend="dam", options=opts)(q, k, v, is_causal=True, enable_gqa=True)
    plan = streaming_plan(40, 40, 16, True, 1, 1)
    expected = block_sparse_attention_reference(q, k, v, plan, is_causal=True, enable_gqa=True)
    assert rel_err(out, expected) < 1e-6
    assert rel_err(out, sdpa(q, k, v, is_causal=True, enable_gqa=True)) > 1e-2  # really sparse, not dense
    (report,) = dam_compile.graph_reports()
    assert report.sites[0].mask_source == "streaming"
    assert dam_compile.runtime_stats() == {"reference: kernel='reference'": 1}


def test_explicit_backend_callable_and_torch_compile_options_merge():
    q, k, v = _qkv()
    bound = dam_compile.backend(**CPU_SPARSE)
    out = torch.compile(sdpa, backend=bound, options={"mask_source": "streaming", "local_blocks": 1})(
        q, k, v, is_causal=True, enable_gqa=True
    )
    expected = block_sparse_attention_reference(q, k, v, streaming_plan(40, 40, 16, True, 1, 1), is_causal=True, enable_gqa=True)
    assert rel_err(out, expected) < 1e-6


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


def test_compile_mode_reaches_inductor(monkeypatch):
    import torch._inductor.compile_fx as inductor_compile

    seen = []

    def spy(gm, example_inputs, config_patches=None, **kwargs):
        seen.append(config_patches)
        return gm.forward

    monkeypatch.setattr(inductor_compile, "compile_fx", spy)
    q, k, v = _qkv()
    torch.compile(sdpa, backend="dam", mode="max-autotune-no-cudagraphs")(q, k, v, is_causal=True, enable_gqa=True)
    assert seen == [torch._inductor.list_mode_options("max-autotune-no-cudagraphs")]
    assert seen[0]["max_autotune"] is True
