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
from .plan.dam_patterns import HeadPatterns
from .ops.dispatch import choose_path
from .plan.block_plan import BlockSparsePlan
from .plan.reference import block_sparse_attention_reference
from .module_stack import AttentionCallMode
from .passes.dense_layers import dense_layer_reason
from .passes.plan_call import plan_call


def plan_for(
    config: DAMConfig, query: torch.Tensor, key: torch.Tensor, is_causal: bool, scale: float | None = None,
    attn_mask: torch.Tensor | None = None, patterns: HeadPatterns | None = None,
    dynamic_heads: torch.Tensor | None = None,
) -> BlockSparsePlan:
    """The plan that the mask generation the pass inserts for ``config`` computes for these inputs. The
    ``calibrated`` source needs the module's ``patterns`` (``profile.patterns_on(name, device)``) and may take
    its ``dynamic_heads`` (bool ``[H]``; default none); its plan carries the token pattern the rewritten op
    gets. A one-row query gets the decode plan, which also reads ``attn_mask``."""
    calibrated = config.source == "calibrated"
    if calibrated and patterns is None:
        raise ValueError("patterns: the calibrated source plans from a module's patterns; pass "
                         "profile.patterns_on(module_name, device)")
    if calibrated and dynamic_heads is None:
        dynamic_heads = torch.zeros(patterns.diagonals.shape[0], dtype=torch.bool, device=query.device)
    decode = query.shape[-2] == 1
    call = plan_call(config.mask_options(), decode=decode, is_causal=is_causal, scale=scale, patterns=patterns,
                     dynamic=dynamic_heads)
    lists = call.run(query, key, attn_mask)
    token = () if decode or not call.patterns else tuple(call.patterns.values())
    return BlockSparsePlan(*lists[:2], config.block_size, *lists[2:], *token)


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
        path, _ = choose_path(query, a["key"], self.config.min_seq_len, self.config.kernel)
        if (a["dropout_p"] != 0 or path == "dense" or (query.shape[-2] == 1 and a["is_causal"])
                or dense_layer_reason(module_name, self.config.dense_layers) is not None):
            return None
        if self.config.source == "calibrated":
            raise ValueError("SparseReferenceMode runs the dynamic, dense and streaming sources; for a profile use "
                             "dam_compile.plan.pattern_plan with the module's patterns")
        plan = plan_for(self.config, query, a["key"], a["is_causal"], a["scale"], a["attn_mask"])
        return block_sparse_attention_reference(
            query, a["key"], a["value"], plan, attn_mask=a["attn_mask"], scale=a["scale"],
            is_causal=a["is_causal"], enable_gqa=a["enable_gqa"],
        )
