"""Eager oracle: run a model's own attention calls as the block-sparse PyTorch reference.

Inside :class:`SparseReferenceMode`, every ``scaled_dot_product_attention`` call computes what the ``dam``
backend's op computes for that call under the same options (same plan, same run-time sparse/dense choice), but
eagerly and without any graph rewrite. Comparing a compiled model with the same model run in this mode checks
the compiler; comparing this mode with plain eager measures what the sparse mask itself changes.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch.overrides import TorchFunctionMode

from .config import DAMConfig
from .kernels.dam_patterns import HeadPatterns
from .kernels.dispatch import choose_path
from .kernels.plan import BlockSparsePlan
from .kernels.reference import block_sparse_attention_reference
from .module_stack import SDPA_FUNCTIONS
from .passes.find_sdpa import bind_sdpa_args
from .passes.insert_mask import DECODE_PLAN, MASK_GENERATORS, decode_generator_args, mask_generator_args


def plan_for(
    config: DAMConfig, query: torch.Tensor, key: torch.Tensor, is_causal: bool, scale: float | None = None,
    attn_mask: torch.Tensor | None = None, patterns: HeadPatterns | None = None,
) -> BlockSparsePlan:
    """The plan that the mask generation the pass inserts for ``config`` computes for these inputs. The
    ``calibrated`` source needs the module's ``patterns`` (``profile.patterns_on(name, device)``); its plan
    carries them as its token pattern, as the rewritten op does. A one-row query gets the decode plan, which
    also reads ``attn_mask``."""
    calibrated = config.source == "calibrated"
    if calibrated and patterns is None:
        raise ValueError("patterns: the calibrated source plans from a module's patterns; pass "
                         "profile.patterns_on(module_name, device)")
    given = (patterns.diagonals, patterns.columns, patterns.corner) if calibrated else ()
    if query.shape[-2] == 1:
        counts, indices = DECODE_PLAN(query, key, attn_mask, *(given[:2] or (None, None)),
                                      *decode_generator_args(config, scale))
        return BlockSparsePlan(counts, indices, config.block_size)
    args, kwargs = mask_generator_args(config, is_causal, scale)
    counts, indices, full_counts, full_indices = MASK_GENERATORS[config.source](query, key, *given, *args, **kwargs)
    return BlockSparsePlan(counts, indices, config.block_size, full_counts, full_indices, *given)


class SparseReferenceMode(TorchFunctionMode):
    """``with SparseReferenceMode({"mask_source": "streaming", "kernel": "reference"}): model(x)`` runs
    attention block-sparse, choosing sparse or dense per call exactly as the op does under those options (so
    ``kernel="auto"`` on a device without a sparse kernel stays dense). Calls the rewrite would leave dense
    (dropout) run unchanged.
    """

    def __init__(self, options: DAMConfig | Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.config = options if isinstance(options, DAMConfig) else DAMConfig.from_options(options)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in SDPA_FUNCTIONS:
            return func(*args, **kwargs)
        a = bind_sdpa_args(args, kwargs)
        query = a["query"]
        path, _ = choose_path(query, a["key"], self.config.min_seq_len, self.config.kernel)
        if a["dropout_p"] != 0 or path == "dense" or (query.shape[-2] == 1 and a["is_causal"]):
            return func(*args, **kwargs)
        if self.config.source == "calibrated":
            raise ValueError("SparseReferenceMode runs the dynamic, dense and streaming sources; for a profile use "
                             "dam_compile.kernels.pattern_plan with the module's patterns")
        plan = plan_for(self.config, query, a["key"], a["is_causal"], a["scale"], a["attn_mask"])
        return block_sparse_attention_reference(
            query, a["key"], a["value"], plan, attn_mask=a["attn_mask"], scale=a["scale"],
            is_causal=a["is_causal"], enable_gqa=a["enable_gqa"],
        )
