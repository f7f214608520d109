"""Eager oracle: run a model's own attention calls as the block-sparse PyTorch reference.

Inside :class:`SparseReferenceMode`, every ``scaled_dot_product_attention`` call computes what the ``dam``
backend's op computes for that call under the same options (same plan, same run-time sparse/dense choice), but
eagerly and without any graph rewrite. Comparing a compiled model with the same model run in this mode checks
the compiler; comparing this mode with plain eager measures what the sparse mask itself changes.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .config import DAMConfig
from .kernels.dispatch import choose_path
from .kernels.plan import BlockSparsePlan
from .kernels.reference import block_sparse_attention_reference
from .kernels.structured_plans import dense_plan, streaming_plan
from .passes.find_sdpa import bind_sdpa_args

_SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)


def plan_for(config: DAMConfig, q_len: int, kv_len: int, is_causal: bool, device: torch.device) -> BlockSparsePlan:
    """The plan ``config.mask_source`` gives an attention of these lengths."""
    if config.mask_source == "streaming":
        return streaming_plan(
            q_len, kv_len, config.block_size, is_causal, config.sink_blocks, config.local_blocks, device
        )
    return dense_plan(q_len, kv_len, config.block_size, is_causal, device)


class SparseReferenceMode(TorchFunctionMode):
    """``with SparseReferenceMode({"mask_source": "streaming"}): model(x)`` runs attention block-sparse.

    Calls the rewrite would leave dense (dropout) run unchanged.
    """

    def __init__(self, options: DAMConfig | Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.config = options if isinstance(options, DAMConfig) else DAMConfig.from_options(options)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _SDPA:
            return func(*args, **kwargs)
        a = bind_sdpa_args(args, kwargs)
        query = a["query"]
        path, _ = choose_path(query, self.config.min_seq_len, "reference")
        if a["dropout_p"] != 0 or path == "dense":
            return func(*args, **kwargs)
        plan = plan_for(self.config, query.shape[-2], a["key"].shape[-2], a["is_causal"], query.device)
        return block_sparse_attention_reference(
            query, a["key"], a["value"], plan, attn_mask=a["attn_mask"], scale=a["scale"],
            is_causal=a["is_causal"], enable_gqa=a["enable_gqa"],
        )
