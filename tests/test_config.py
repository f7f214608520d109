"""``DAMConfig`` (config.py): defaults, validation naming the option, the dump directory from the environment, and
options reaching the backend. The backend itself: test_compile_backend.py."""

import dataclasses

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
