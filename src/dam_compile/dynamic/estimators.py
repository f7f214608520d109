"""The dynamic plan's block estimators, in one registry: adding an estimator is one :class:`EstimatorSpec` here.

Everything else reads it: the definition (``dynamic_plan.dynamic_block_plan``: the estimate, the budget rule,
the density cap, the shard estimate), ``dam::dynamic_plan`` (``ops/attention.py``: the fused Triton plan where
one exists) and ``DAMConfig`` (the valid names, the default, the density an unset ``density`` becomes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

from torch import Tensor

from .adaptive_plan_kernel import adaptive_block_plan
from .block_estimates import (
    BlockEstimate,
    adaptive_estimate,
    last_block_estimate,
    pooled_block_estimate,
    sampled_estimate,
    sampled_shard_estimate,
)
from .sampled_plan_kernel import sampled_block_plan

PlanTensors = tuple[Tensor, Tensor, Tensor, Tensor]

# The fixed share of a row's other visible blocks that the estimators without mass budgets keep (and their
# dynamic decode steps at least), unless the config sets ``density``.
FIXED_DENSITY = 0.075


class DensityDefaults(NamedTuple):
    """What an estimator takes when the config leaves ``density`` unset: ``prefill_cap``, the share of a head's
    other visible blocks it may keep beyond sink and local (1.0: no cap), and ``decode_floor``, the share a
    decode step keeps at least (beside every block holding ``EXACT_ROW_MASS`` of its exact attention)."""

    prefill_cap: float
    decode_floor: float


@dataclass(frozen=True)
class EstimatorSpec:
    """One estimator: ``estimate(query, key, block_size, is_causal, scale)`` (``block_estimates``);
    ``mass_budget``: its rows' budgets follow the estimated mass (every block may be needed: the plan sorts
    whole rows), else each row gets a fixed share of ``density`` (a top-k of the plan's width); ``density``: its
    defaults; ``shard_estimate``: the estimate of a context-parallel rank's query blocks (``None``: the
    estimator plans no shard); ``fused_plan``: Triton kernels computing the definition's lists with
    ``dynamic_block_plan``'s keyword arguments less ``estimator`` (``None``: the definition runs compiled)."""

    estimate: Callable[[Tensor, Tensor, int, bool, float], BlockEstimate]
    mass_budget: bool
    density: DensityDefaults
    shard_estimate: Callable[..., BlockEstimate] | None = None
    fused_plan: Callable[..., PlanTensors] | None = None


_FIXED = DensityDefaults(prefill_cap=FIXED_DENSITY, decode_floor=FIXED_DENSITY)
ESTIMATOR_SPECS: dict[str, EstimatorSpec] = {
    # No density cap: budgets follow the mass alone (a cap cuts the diffuse heads of a real model's early layers;
    # on SmolLM2-135M at 8K its layers 1-10 keep 62-75% of their blocks for 0.99 of their mass:
    # benchmarks/results/real_cpu.json).
    "sampled": EstimatorSpec(sampled_estimate, mass_budget=True, density=DensityDefaults(1.0, 0.0),
                             shard_estimate=sampled_shard_estimate, fused_plan=sampled_block_plan),
    # The others keep their earlier fixed default.
    "adaptive": EstimatorSpec(adaptive_estimate, mass_budget=True, density=_FIXED, fused_plan=adaptive_block_plan),
    "pooled": EstimatorSpec(pooled_block_estimate, mass_budget=False, density=_FIXED),
    "last_block": EstimatorSpec(last_block_estimate, mass_budget=False, density=_FIXED),
}
ESTIMATORS = tuple(ESTIMATOR_SPECS)  # the valid names, in the registry's order
DEFAULT_ESTIMATOR = "sampled"


def estimator_spec(name: str) -> EstimatorSpec:
    """The registry's entry for ``name``; a ``ValueError`` naming the valid ones for any other."""
    if name not in ESTIMATOR_SPECS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {name!r}")
    return ESTIMATOR_SPECS[name]
