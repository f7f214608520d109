"""Step (c): insert the mask-generation subgraph that computes a site's block-sparse plan at run time.

The subgraph is one plan call on the site's query and key, plus one ``getitem`` per plan tensor; its output
follows :class:`dam_compile.kernels.BlockSparsePlan`. The call, by ``mask_source``:

- ``dynamic``: ``dam::dynamic_plan`` (DAM estimated from this input's Q and K);
- ``calibrated``: ``dam::pattern_plan`` on the module's DAM patterns, which become buffers of the graph module
  (``get_attr`` nodes) and also feed the sparse op as its token-exact pattern;
- ``dense`` / ``streaming``: ``dam::dense_plan`` / ``dam::streaming_plan``.

A site whose query is one row (a decode step: Dynamo specialises a length of 1) gets ``dam::decode_plan`` for
every source instead; it also reads the attention mask (which says where the row sits in a static cache) and,
for ``calibrated``, the diagonals and columns. Its plan has two tensors (no full blocks).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch._dynamo.source import ConstantSource
from torch.fx import Graph, GraphModule, Node

from ..config import DAMConfig
from ..kernels import ops as _ops  # noqa: F401  (registers torch.ops.dam.*)
from ..profile import DAMProfile, ProfileMismatchError
from .decide import example_value, op_scale
from .find_sdpa import SDPASite

PLAN_TENSORS = 4  # kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices
DECODE_PLAN_TENSORS = 2  # kv_num_blocks, kv_indices
# The op's plan arguments: those four, then token_diagonals, token_columns and token_corner (None for
# block-level sources).
PLAN_OP_ARGS = 7
PATTERN_TENSORS = ("diagonals", "columns", "corner")

MASK_GENERATORS: dict[str, Callable[..., Any]] = {
    "dynamic": torch.ops.dam.dynamic_plan.default,
    "calibrated": torch.ops.dam.pattern_plan.default,
    "dense": torch.ops.dam.dense_plan.default,
    "streaming": torch.ops.dam.streaming_plan.default,
}
DECODE_PLAN = torch.ops.dam.decode_plan.default


@dataclass
class MaskSubgraph:
    plan: Node
    outputs: tuple[Node, ...]
    patterns: tuple[Node, ...] = ()  # get_attr nodes of the token-exact pattern (calibrated)
    decode: bool = False  # a decode plan: also reads the mask; its patterns feed only the plan

    @property
    def op_patterns(self) -> tuple[Node, ...]:
        """The pattern nodes the sparse op reads (prefill's token-exact pattern)."""
        return () if self.decode else self.patterns


def is_decode(site: SDPASite) -> bool:
    """A query of (statically) one row: a decode step."""
    length = example_value(site.query).shape[-2]
    return isinstance(length, int) and length == 1


def mask_generator_args(config: DAMConfig, is_causal: bool, scale: float | Node | None) -> tuple[tuple, dict]:
    """``(args, kwargs)`` after ``(query, key)`` (and, for ``calibrated``, the three pattern tensors) of the
    ``config.source`` prefill plan call."""
    common = (config.block_size, is_causal, config.min_seq_len, config.kernel)
    if config.source == "dynamic":
        return (*common, scale, config.tau, config.box_cox_lambda, config.mu, config.density, config.mass_target,
                config.sink_blocks, config.local_blocks, config.estimator), {}
    if config.source == "streaming":
        return (*common, config.sink_blocks, config.local_blocks), {}
    return common, {}


def decode_generator_args(config: DAMConfig, scale: float | Node | None) -> tuple:
    """The arguments of ``dam::decode_plan`` after ``(query, key, attn_mask, diagonals, columns)``."""
    corner_len = config.profile.pcl if config.source == "calibrated" else 0
    return (config.source, config.block_size, config.min_seq_len, config.kernel, config.sink_blocks,
            config.local_blocks, config.density, scale, corner_len)


def profile_entry(profile: DAMProfile, site: SDPASite) -> str | None:
    """The profile's module name for ``site`` (``None`` when it has none). Raises
    :class:`ProfileMismatchError` when the entry exists but its head count differs from the site's."""
    name = profile.find_module(site.module_path) if site.module_path else None
    if name is None:
        return None
    heads = example_value(site.query).shape[1]
    if profile.modules[name].heads != heads:
        raise ProfileMismatchError(
            f"the profile's {name} has {profile.modules[name].heads} query heads but the graph's attention at "
            f"{site.module_path} has {heads}: the profile was calibrated for another model"
        )
    return name


def _pattern_buffers(
    gm: GraphModule, site: SDPASite, config: DAMConfig, entry: str, labels: tuple[str, ...] = PATTERN_TENSORS
) -> tuple[Node, ...]:
    """Register ``entry``'s patterns (those named in ``labels``) as buffers of ``gm`` on the site's device;
    ``get_attr`` nodes for them."""
    device = example_value(site.query).device
    patterns = config.profile.patterns_on(entry, device)
    values = dict(diagonals=patterns.diagonals, columns=patterns.columns, corner=patterns.corner)
    stem = "_dam_" + re.sub(r"\W", "_", entry)
    nodes = []
    for label in labels:
        name = f"{stem}_{label}"
        if not hasattr(gm, name):
            gm.register_buffer(name, values[label], persistent=False)
            sources = getattr(gm, "_param_name_to_source", None)
            if sources is not None:  # AOTAutograd wants a source for each buffer of a Dynamo graph
                sources[name] = ConstantSource(f"__dam_pattern_{name}")
        nodes.append(gm.graph.get_attr(name))
    return tuple(nodes)


def insert_mask_generation(gm: GraphModule, site: SDPASite, config: DAMConfig, entry: str | None = None) -> MaskSubgraph:
    """Insert the plan computation for ``site`` just before it; returns the new nodes. ``entry``: the
    profile's module name (calibrated source)."""
    graph: Graph = gm.graph
    scale = op_scale(site)
    decode = is_decode(site)
    calibrated = config.source == "calibrated"
    with graph.inserting_before(site.node):
        if decode:
            patterns = _pattern_buffers(gm, site, config, entry, PATTERN_TENSORS[:2]) if calibrated else ()
            given = (*patterns, *(None,) * (2 - len(patterns)))
            plan_args = (site.query, site.key, site.attn_mask, *given, *decode_generator_args(config, scale))
            plan = graph.call_function(DECODE_PLAN, plan_args)
            count = DECODE_PLAN_TENSORS
        else:
            patterns = _pattern_buffers(gm, site, config, entry) if calibrated else ()
            args, kwargs = mask_generator_args(config, site.is_causal, scale)
            plan = graph.call_function(MASK_GENERATORS[config.source], (site.query, site.key, *patterns, *args), kwargs)
            count = PLAN_TENSORS
        outputs = tuple(graph.call_function(operator.getitem, (plan, i)) for i in range(count))
    for node in (*patterns, plan, *outputs):
        node.meta["stack_trace"] = site.node.meta.get("stack_trace")
        node.meta["nn_module_stack"] = site.node.meta.get("nn_module_stack")
    return MaskSubgraph(plan, outputs, patterns, decode)
