"""Step (c): insert the mask-generation subgraph that computes a site's block-sparse plan at run time.

The subgraph is one plan call on the site's query and key, plus one ``getitem`` per plan tensor; its output
follows :class:`dam_compile.kernels.BlockSparsePlan`. The call, by ``mask_source``:

- ``dynamic``: :func:`dynamic_block_plan`, plain PyTorch that Inductor traces and fuses with the graph;
- ``calibrated``: ``dam::pattern_plan`` on the module's DAM patterns, which become buffers of the graph module
  (``get_attr`` nodes) and also feed the sparse op as its token-exact pattern;
- ``dense`` / ``streaming``: ``dam::dense_plan`` / ``dam::streaming_plan``.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.fx import Graph, GraphModule, Node

from ..config import DAMConfig
from ..kernels import ops as _ops  # noqa: F401  (registers torch.ops.dam.*)
from ..kernels.dynamic_mask import dynamic_block_plan
from ..profile import DAMProfile, ProfileMismatchError
from .decide import example_value
from .find_sdpa import SDPASite

PLAN_TENSORS = 4  # kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices
# The op's plan arguments: those four, then token_diagonals, token_columns and token_corner (None for
# block-level sources).
PLAN_OP_ARGS = 7
PATTERN_TENSORS = ("diagonals", "columns", "corner")

MASK_GENERATORS: dict[str, Callable[..., Any]] = {
    "dynamic": dynamic_block_plan,
    "calibrated": torch.ops.dam.pattern_plan.default,
    "dense": torch.ops.dam.dense_plan.default,
    "streaming": torch.ops.dam.streaming_plan.default,
}


@dataclass
class MaskSubgraph:
    plan: Node
    outputs: tuple[Node, ...]
    patterns: tuple[Node, ...] = ()  # get_attr nodes of the token-exact pattern (calibrated)


def mask_generator_args(config: DAMConfig, is_causal: bool, scale: float | None) -> tuple[tuple, dict]:
    """``(args, kwargs)`` after ``(query, key)`` (and, for ``calibrated``, the three pattern tensors) of the
    ``config.source`` plan call."""
    if config.source == "dynamic":
        return (), dict(
            block_size=config.block_size, is_causal=is_causal, scale=scale, tau=config.tau,
            box_cox_lambda=config.box_cox_lambda, mu=config.mu, density=config.density,
            mass_target=config.mass_target, sink_blocks=config.sink_blocks, local_blocks=config.local_blocks,
            estimator=config.estimator,
        )
    common = (config.block_size, is_causal, config.min_seq_len, config.kernel)
    if config.source == "streaming":
        return (*common, config.sink_blocks, config.local_blocks), {}
    return common, {}


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


def _pattern_buffers(gm: GraphModule, site: SDPASite, config: DAMConfig, entry: str) -> tuple[Node, ...]:
    """Register ``entry``'s patterns as buffers of ``gm`` on the site's device; ``get_attr`` nodes for them."""
    device = example_value(site.query).device
    patterns = config.profile.patterns_on(entry, device)
    values = (patterns.diagonals, patterns.columns, patterns.corner)
    stem = "_dam_" + re.sub(r"\W", "_", entry)
    nodes = []
    for label, value in zip(PATTERN_TENSORS, values):
        name = f"{stem}_{label}"
        if not hasattr(gm, name):
            gm.register_buffer(name, value, persistent=False)
        nodes.append(gm.graph.get_attr(name))
    return tuple(nodes)


def insert_mask_generation(gm: GraphModule, site: SDPASite, config: DAMConfig, entry: str | None = None) -> MaskSubgraph:
    """Insert the plan computation for ``site`` just before it; returns the new nodes. ``entry``: the
    profile's module name (calibrated source)."""
    graph: Graph = gm.graph
    scale = None if site.scale is None else float(site.scale)
    args, kwargs = mask_generator_args(config, site.is_causal, scale)
    with graph.inserting_before(site.node):
        patterns: tuple[Node, ...] = ()
        if config.source == "calibrated":
            patterns = _pattern_buffers(gm, site, config, entry)
        plan = graph.call_function(MASK_GENERATORS[config.source], (site.query, site.key, *patterns, *args), kwargs)
        outputs = tuple(graph.call_function(operator.getitem, (plan, i)) for i in range(PLAN_TENSORS))
    for node in (*patterns, plan, *outputs):
        node.meta["stack_trace"] = site.node.meta.get("stack_trace")
        node.meta["nn_module_stack"] = site.node.meta.get("nn_module_stack")
    return MaskSubgraph(plan, outputs, patterns)
