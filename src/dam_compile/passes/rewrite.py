"""Step (d): replace an SDPA node with ``torch.ops.dam.sparse_attention`` fed by its mask subgraph."""

from __future__ import annotations

import torch
from torch.fx import Graph, Node

from dam_compile.plan.mask_options import MaskOptions
from .decide import op_scale
from .find_sdpa import SDPASite
from .insert_mask import PLAN_OP_ARGS, MaskSubgraph
from .key_padding import KeyPaddingNodes

SPARSE_ATTENTION = torch.ops.dam.sparse_attention.default

# Metadata that describes where the node came from; shapes/strides of the new op are its own.
_KEPT_META = ("stack_trace", "nn_module_stack", "source_fn_stack")


def replace_with_sparse_attention(graph: Graph, site: SDPASite, mask: MaskSubgraph, options: MaskOptions,
                                  padding: KeyPaddingNodes | None = None) -> Node:
    """Swap ``site.node`` for the sparse op; every user of the old node now reads the new one. Tensors and the
    scale go by position, the flags and sizes by name; ``padding`` (a causal-and-padding mask's description,
    whose row is ``site.attn_mask``): its key ranges and kind, by name."""
    scale = op_scale(site)
    given = (*mask.outputs, *mask.op_patterns)
    plan_args = (*given, *(None,) * (PLAN_OP_ARGS - len(given)))
    kwargs = options.attention_kwargs(site.is_causal, site.enable_gqa)
    if padding is not None:
        kwargs.update(kv_range=padding.kv_range, padding_kind=padding.kind)
    with graph.inserting_before(site.node):
        new = graph.call_function(
            SPARSE_ATTENTION, (site.query, site.key, site.value, *plan_args, site.attn_mask, scale), kwargs)
    for key in _KEPT_META:
        if key in site.node.meta:
            new.meta[key] = site.node.meta[key]
    site.node.replace_all_uses_with(new)
    graph.erase_node(site.node)
    return new
