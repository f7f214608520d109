"""Step (c): insert the mask-generation subgraph that computes a site's block-sparse plan at run time.

The subgraph is one plan call on the site's query and key, plus one ``getitem`` per plan tensor; its output
follows :class:`dam_compile.plan.BlockSparsePlan`. Tensors go to the call by position, every other argument
by name (:class:`MaskOptions`). The call, by ``mask_source``:

- ``dynamic``: ``dam::dynamic_plan`` (DAM estimated from this input's Q and K);
- ``calibrated``: ``dam::pattern_plan`` on the module's DAM patterns, which become buffers of the graph module
  (``get_attr`` nodes) and also feed the sparse op as its token-exact pattern. A module whose profile marks
  some heads dynamic (retrieval heads) gets ``dam::hybrid_plan`` instead, on the patterns rewritten by
  :func:`hybrid_token_pattern` and a bool ``[H]`` buffer of those heads; one whose every head is dynamic gets
  ``dam::dynamic_plan``;
- ``dense`` / ``streaming``: ``dam::dense_plan`` / ``dam::streaming_plan``.

A site whose query is one row (a decode step: Dynamo specialises a length of 1) gets ``dam::decode_plan`` for
every source instead; it also reads the attention mask (which says where the row sits in a static cache) and,
for ``calibrated``, the diagonals and columns, and the dynamic heads when there are any. Its plan has two
tensors (no full blocks). :mod:`.plan_call` decides the call; this module puts it into the graph.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

from torch import Tensor
from torch._dynamo.source import ConstantSource
from torch.fx import GraphModule, Node

from dam_compile.plan.mask_options import MaskOptions
from .decide import example_value, op_scale
from .find_sdpa import SDPASite
from .plan_call import one_row, plan_call
from .profile_protocol import SiteProfile

PLAN_TENSORS = 4  # kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices
DECODE_PLAN_TENSORS = 2  # kv_num_blocks, kv_indices
# The op's plan arguments: those four, then token_diagonals, token_columns and token_corner (None for
# block-level sources).
PLAN_OP_ARGS = 7


@dataclass
class MaskSubgraph:
    plan: Node
    outputs: tuple[Node, ...] = ()  # one getitem per plan tensor
    patterns: tuple[Node, ...] = ()  # get_attr nodes of the token-exact pattern (calibrated)
    decode: bool = False  # a decode plan: also reads the mask; its patterns feed only the plan
    plan_inputs: tuple[Node, ...] = ()  # get_attr nodes only the plan reads, by name (the dynamic heads)
    dynamic_heads: tuple[int, ...] = ()  # query heads that run the dynamic plan at a calibrated site

    @property
    def op_patterns(self) -> tuple[Node, ...]:
        """The pattern nodes the sparse op reads (prefill's token-exact pattern)."""
        return () if self.decode else self.patterns


def is_decode(site: SDPASite) -> bool:
    """A query of (statically) one row: a decode step."""
    return one_row(example_value(site.query))


def _buffer_nodes(gm: GraphModule, stem: str, values: dict[str, Tensor]) -> tuple[Node, ...]:
    """Register ``values`` as buffers ``<stem>_<label>`` of ``gm`` (once); ``get_attr`` nodes for them."""
    nodes = []
    for label, value in values.items():
        name = f"{stem}_{label}"
        if not hasattr(gm, name):
            gm.register_buffer(name, value, persistent=False)
            sources = getattr(gm, "_param_name_to_source", None)
            if sources is not None:  # AOTAutograd wants a source for each buffer of a Dynamo graph
                sources[name] = ConstantSource(f"__dam_pattern_{name}")
        nodes.append(gm.graph.get_attr(name))
    return tuple(nodes)


def insert_mask_generation(
    gm: GraphModule, site: SDPASite, options: MaskOptions, profile: SiteProfile | None = None,
    entry: str | None = None,
) -> MaskSubgraph:
    """Insert the plan computation for ``site`` just before it; returns the new nodes. ``profile`` and
    ``entry`` (the profile's module name for the site): the calibrated source's."""
    call = plan_call(options, example_value(site.query), is_causal=site.is_causal, scale=op_scale(site),
                     profile=profile, entry=entry)
    stem = "" if entry is None else "_dam_" + re.sub(r"\W", "_", entry)  # buffer names of the module's tensors
    graph = gm.graph
    with graph.inserting_before(site.node):
        pattern_nodes = _buffer_nodes(gm, stem + call.tag, call.patterns)
        extra = _buffer_nodes(gm, stem, call.tensor_kwargs)
        plan = graph.call_function(call.op, call.args(site.query, site.key, site.attn_mask, pattern_nodes),
                                   {**call.kwargs, **dict(zip(call.tensor_kwargs, extra))})
        count = DECODE_PLAN_TENSORS if call.decode else PLAN_TENSORS
        outputs = tuple(graph.call_function(operator.getitem, (plan, i)) for i in range(count))
    for node in (*pattern_nodes, *extra, plan, *outputs):
        node.meta["stack_trace"] = site.node.meta.get("stack_trace")
        node.meta["nn_module_stack"] = site.node.meta.get("nn_module_stack")
    return MaskSubgraph(plan, outputs, pattern_nodes, call.decode, extra, call.dynamic_heads)
