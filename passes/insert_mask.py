"""Step (c): insert the mask-generation subgraph that computes a site's block-sparse plan at run time.

The subgraph is one call to a ``dam::*_plan`` op (chosen by ``mask_source``) on the site's query and key,
plus one ``getitem`` per plan tensor. Its output follows :class:`dam_compile.kernels.BlockSparsePlan`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Graph, Node

from ..config import DAMConfig
from ..kernels import ops as _ops  # noqa: F401  (registers torch.ops.dam.*)
from .find_sdpa import SDPASite

PLAN_TENSORS = 4  # kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices
# The op's plan arguments: those four, then token_diagonals and token_columns (None for block-level sources).
PLAN_OP_ARGS = 6

MASK_GENERATORS = {
    "dense": torch.ops.dam.dense_plan.default,
    "streaming": torch.ops.dam.streaming_plan.default,
}


@dataclass
class MaskSubgraph:
    plan: Node
    outputs: tuple[Node, ...]


def mask_generator_constants(config: DAMConfig, is_causal: bool) -> tuple[Any, ...]:
    """The arguments after ``(query, key)`` of the ``config.mask_source`` plan op."""
    common = (config.block_size, is_causal, config.min_seq_len, config.kernel)
    if config.mask_source == "streaming":
        return (*common, config.sink_blocks, config.local_blocks)
    return common


def insert_mask_generation(graph: Graph, site: SDPASite, config: DAMConfig) -> MaskSubgraph:
    """Insert the plan computation for ``site`` just before it; returns the new nodes."""
    with graph.inserting_before(site.node):
        args = (site.query, site.key, *mask_generator_constants(config, site.is_causal))
        plan = graph.call_function(MASK_GENERATORS[config.mask_source], args)
        outputs = tuple(graph.call_function(operator.getitem, (plan, i)) for i in range(PLAN_TENSORS))
    for node in (plan, *outputs):
        node.meta["stack_trace"] = site.node.meta.get("stack_trace")
        node.meta["nn_module_stack"] = site.node.meta.get("nn_module_stack")
    return MaskSubgraph(plan, outputs)
