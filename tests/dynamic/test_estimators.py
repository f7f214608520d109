"""The estimator registry (``estimators``): every name has a consistent entry (an estimate that is a distribution
over the visible blocks, density defaults, a shard estimate and fused kernels that take what the definition
passes them), the config and the planner read their defaults from it, and an unknown name raises naming the
argument and the valid names."""

import inspect

import pytest
import torch

from dam_compile.config import DAMConfig
from dam_compile.dynamic import block_estimates
from dam_compile.dynamic.dynamic_plan import QueryShard, dynamic_block_plan
from dam_compile.dynamic.estimators import (
    DEFAULT_ESTIMATOR,
    ESTIMATOR_SPECS,
    ESTIMATORS,
    FIXED_DENSITY,
    DensityDefaults,
    EstimatorSpec,
    estimator_spec,
)


def test_names_default_and_entries():
    assert ESTIMATORS == tuple(ESTIMATOR_SPECS) and len(set(ESTIMATORS)) == len(ESTIMATORS)
    assert DEFAULT_ESTIMATOR in ESTIMATORS and DAMConfig().estimator == DEFAULT_ESTIMATOR
    for name in ESTIMATORS:
        spec = estimator_spec(name)
        assert spec is ESTIMATOR_SPECS[name] and isinstance(spec, EstimatorSpec)
        assert getattr(block_estimates, spec.estimate.__name__) is spec.estimate, name  # tested there
        shard = spec.shard_estimate
        assert shard is None or getattr(block_estimates, shard.__name__) is shard, name
        assert isinstance(spec.mass_budget, bool)
        assert isinstance(spec.density, DensityDefaults)
        assert 0 < spec.density.prefill_cap <= 1 and 0 <= spec.density.decode_floor <= 1, name
        if not spec.mass_budget:  # a fixed share of each row: the fixed default
            assert spec.density == DensityDefaults(FIXED_DENSITY, FIXED_DENSITY), name


def test_the_default_estimator_has_fused_kernels():
    """The default's plan never runs the compiled definition on CUDA (about 1.5 ms of host time per call: a
    real model's compiled prefill was slower than eager at 8K)."""
    assert ESTIMATOR_SPECS[DEFAULT_ESTIMATOR].fused_plan is not None


def test_fused_plans_take_the_definitions_keyword_arguments():
    """``fused_plan`` gets ``dynamic_block_plan``'s keyword arguments less ``estimator`` (and ``shard``, which no
    fused plan serves): the same names, so the op can hand one dict to either."""
    definition = {name for name, p in inspect.signature(dynamic_block_plan).parameters.items()
                  if p.kind == p.KEYWORD_ONLY} - {"estimator", "shard"}
    fused = {name: spec.fused_plan for name, spec in ESTIMATOR_SPECS.items() if spec.fused_plan is not None}
    assert fused
    for name, plan in fused.items():
        keywords = {n for n, p in inspect.signature(plan).parameters.items() if p.kind == p.KEYWORD_ONLY}
        assert keywords == definition, name


def test_a_shard_plan_needs_an_estimator_with_a_shard_estimate():
    sharded = [name for name, spec in ESTIMATOR_SPECS.items() if spec.shard_estimate is not None]
    assert sharded and DEFAULT_ESTIMATOR in sharded  # context parallelism plans with the default
    q, k = torch.randn(1, 2, 64, 16), torch.randn(1, 2, 128, 16)
    shard = QueryShard(torch.tensor([0, 3]), 128, lambda t: t, lambda t: t)
    for name in ESTIMATORS:
        if name in sharded:
            lists = dynamic_block_plan(q, k, block_size=32, is_causal=True, estimator=name, shard=shard)
            assert lists[0].shape == (1, 2, 2)
        else:
            with pytest.raises(ValueError, match=f"shard: a context-parallel plan takes the {sharded[0]}"):
                dynamic_block_plan(q, k, block_size=32, is_causal=True, estimator=name, shard=shard)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_an_unset_density_becomes_the_estimators_defaults(name):
    defaults = ESTIMATOR_SPECS[name].density
    options = DAMConfig(estimator=name).mask_options()
    assert (options.density, options.decode_density) == (defaults.prefill_cap, defaults.decode_floor)
    options = DAMConfig(estimator=name, density=0.42).mask_options()
    assert (options.density, options.decode_density) == (0.42, 0.42)


def test_unknown_names_raise_naming_the_argument_and_the_valid_ones():
    with pytest.raises(ValueError, match=r"estimator must be one of \('sampled'.*got 'oracle'") as error:
        estimator_spec("oracle")
    assert all(name in str(error.value) for name in ESTIMATORS)
    with pytest.raises(ValueError, match="estimator"):
        DAMConfig(estimator="oracle")
    with pytest.raises(ValueError, match="estimator"):
        dynamic_block_plan(torch.randn(1, 1, 32, 8), torch.randn(1, 1, 32, 8), block_size=16, is_causal=True,
                           estimator="oracle")
