"""Eager oracle: run a model's own attention calls as the block-sparse PyTorch reference.

Inside :class:`SparseReferenceMode`, every ``scaled_dot_product_attention`` call computes what the ``dam``
backend's op computes for that call under the same options (same plan, same run-time sparse/dense choice), but
eagerly and without any graph rewrite. Comparing a compiled model with the same model run in this mode checks
the compiler; comparing this mode with plain eager measures what the sparse mask itself changes.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .config import DAMConfig
from .ops.dispatch import call_path
from .plan.block_plan import BlockSparsePlan
from .plan.reference import block_sparse_attention_reference
from .module_stack import AttentionCallMode
from .passes.pipeline import NO_PROFILE_ENTRY
from .passes.plan_call import PlanCall, plan_call


def plan_call_for(config: DAMConfig, query: torch.Tensor, is_causal: bool, scale: float | None = None,
                  module: str | None = None) -> PlanCall:
    """The plan call the pass inserts under ``config`` for a call of the module at path ``module`` with this
    query (:func:`plan_call`). The ``calibrated`` source needs ``module``: its profile entry
    (``DAMProfile.find_module``) gives the patterns and dynamic heads."""
    entry = None
    if config.source == "calibrated":
        if module is None:
            raise ValueError("module: the calibrated source plans from the profile's entry for the module; pass "
                             "its path in the model")
        entry = config.profile.find_module(module)
        if entry is None:
            raise ValueError(f"{NO_PROFILE_ENTRY} {module!r}")
    return plan_call(config.mask_options(), query, is_causal=is_causal, scale=scale, profile=config.profile,
                     entry=entry)


def plan_for(
    config: DAMConfig, query: torch.Tensor, key: torch.Tensor, is_causal: bool, scale: float | None = None,
    attn_mask: torch.Tensor | None = None, module: str | None = None,
) -> BlockSparsePlan:
    """The plan that the mask generation the pass inserts for ``config`` computes for these inputs
    (:func:`plan_call_for`; the ``calibrated`` source's carries the token pattern the rewritten op gets). A
    one-row query gets the decode plan, which also reads ``attn_mask``."""
    call = plan_call_for(config, query, is_causal, scale, module)
    return call.plan(call.run(query, key, attn_mask))


class SparseReferenceMode(AttentionCallMode):
    """``with SparseReferenceMode({"mask_source": "streaming", "kernel": "reference"}, model): model(x)`` runs
    attention block-sparse, choosing sparse or dense per call exactly as the op does under those options (so
    ``kernel="auto"`` on a device without a sparse kernel stays dense). Calls the rewrite would leave dense
    (dropout) run unchanged, as do those of the first ``dense_layers`` layers, which ``model`` names; without
    ``model`` the options must set ``dense_layers=0``.
    """

    def __init__(self, options: DAMConfig | Mapping[str, Any] | None = None,
                 model: torch.nn.Module | None = None) -> None:
        config = options if isinstance(options, DAMConfig) else DAMConfig.from_options(options)
        if model is None and config.dense_layers:
            raise ValueError(f"model: SparseReferenceMode keeps the first dense_layers={config.dense_layers} "
                             "layers dense and needs the model to know them; pass model= or dense_layers=0")
        super().__init__(model)
        self.config = config

    def on_attention(self, module_name: str, a: dict[str, Any]) -> torch.Tensor | None:
        query = a["query"]
        if a["dropout_p"] != 0 or (query.shape[-2] == 1 and a["is_causal"]):
            return None  # calls the pass leaves as SDPA (passes/decide.py)
        if call_path(self.config, module_name, query, a["key"])[0] == "dense":
            return None
        if self.config.source == "calibrated":
            raise ValueError("SparseReferenceMode runs the dynamic, dense and streaming sources; for a profile use "
                             "dam_compile.plan.pattern_plan with the module's patterns")
        plan = plan_for(self.config, query, a["key"], a["is_causal"], a["scale"], a["attn_mask"])
        return block_sparse_attention_reference(
            query, a["key"], a["value"], plan, attn_mask=a["attn_mask"], scale=a["scale"],
            is_causal=a["is_causal"], enable_gqa=a["enable_gqa"],
        )
