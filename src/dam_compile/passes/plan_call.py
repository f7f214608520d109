"""Which mask-generation op a site calls, with which tensors and arguments: one decision shared by the graph
pass (which inserts the call) and the eager oracles (which run it), so the two cannot drift apart.

By source (see :mod:`.insert_mask`): ``dam::dynamic_plan``, ``dam::dense_plan``, ``dam::streaming_plan``;
calibrated: ``dam::pattern_plan`` on the module's patterns, ``dam::hybrid_plan`` when the profile marks some of
its heads dynamic, ``dam::dynamic_plan`` when it marks all; ``dam::decode_plan`` for a one-row query.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from dam_compile.ops import attention as _ops  # noqa: F401  (registers torch.ops.dam.*)
from dam_compile.plan.dam_patterns import HeadPatterns
from dam_compile.ops.hybrid_plan import hybrid_token_pattern
from dam_compile.plan.mask_options import MaskOptions

MASK_GENERATORS: dict[str, Callable[..., Any]] = {
    "dynamic": torch.ops.dam.dynamic_plan.default,
    "calibrated": torch.ops.dam.pattern_plan.default,
    "dense": torch.ops.dam.dense_plan.default,
    "streaming": torch.ops.dam.streaming_plan.default,
}
HYBRID_PLAN = torch.ops.dam.hybrid_plan.default
DECODE_PLAN = torch.ops.dam.decode_plan.default
PATTERN_TENSORS = ("diagonals", "columns", "corner")


@dataclass(frozen=True)
class PlanCall:
    """``op(query, key, [attn_mask,] *patterns, **kwargs, **tensor_kwargs)``.

    ``patterns``: tensors by position after ``(query, key)`` (a decode plan: after the mask too, and always two
    slots, ``None`` when empty); in a prefill plan they are also the sparse op's token pattern. ``tensor_kwargs``:
    tensors passed by name (the dynamic heads). ``tag``: a buffer-name suffix for patterns that depend on more
    than the profile (the hybrid token pattern depends on the block size). ``dynamic_heads``: the query heads that
    run the dynamic plan at a calibrated site."""

    op: Callable[..., Any]
    decode: bool
    kwargs: dict[str, Any]
    patterns: dict[str, Tensor] = field(default_factory=dict)
    tensor_kwargs: dict[str, Tensor] = field(default_factory=dict)
    tag: str = ""
    dynamic_heads: tuple[int, ...] = ()

    def args(self, query: Any, key: Any, attn_mask: Any, patterns: tuple[Any, ...]) -> tuple[Any, ...]:
        """The positional arguments, given the (nodes or tensors standing for the) patterns."""
        if self.decode:
            return (query, key, attn_mask, *patterns, *(None,) * (2 - len(patterns)))
        return (query, key, *patterns)

    def run(self, query: Tensor, key: Tensor, attn_mask: Tensor | None = None) -> tuple[Tensor, ...]:
        """Call the op eagerly."""
        return self.op(*self.args(query, key, attn_mask, tuple(self.patterns.values())), **self.kwargs,
                       **self.tensor_kwargs)


def plan_call(
    options: MaskOptions, *, decode: bool, is_causal: bool, scale: Any, patterns: HeadPatterns | None = None,
    dynamic: Tensor | None = None,
) -> PlanCall:
    """The call for a site. ``patterns`` and ``dynamic`` (bool ``[H]``, the profile's dynamic heads, on the
    site's device): the calibrated source's, required for it and ignored otherwise."""
    if options.source != "calibrated":
        if decode:
            return PlanCall(DECODE_PLAN, True, options.decode_plan_kwargs(scale))
        return PlanCall(MASK_GENERATORS[options.source], False, options.prefill_plan_kwargs(is_causal, scale))
    if patterns is None or dynamic is None:
        raise ValueError("patterns and dynamic: the calibrated source plans from a module's patterns and dynamic "
                         "heads")
    heads = tuple(int(h) for h in dynamic.nonzero().flatten().tolist())
    chosen = {"dynamic_heads": dynamic} if heads else {}
    if decode:
        values = dict(diagonals=patterns.diagonals, columns=patterns.columns)
        return PlanCall(DECODE_PLAN, True, options.decode_plan_kwargs(scale), values, chosen, dynamic_heads=heads)
    if len(heads) == dynamic.numel():  # every head dynamic: no pattern left to apply
        return PlanCall(MASK_GENERATORS["dynamic"], False, options.dynamic_plan_kwargs(is_causal, scale),
                        dynamic_heads=heads)
    if not heads:
        return PlanCall(MASK_GENERATORS["calibrated"], False, options.dense_plan_kwargs(is_causal),
                        pattern_values(patterns))
    # Some heads dynamic: the token pattern lets their partial blocks through (see kernels/hybrid_plan.py).
    token = hybrid_token_pattern(patterns, dynamic, options.block_size)
    return PlanCall(HYBRID_PLAN, False, options.dynamic_plan_kwargs(is_causal, scale), pattern_values(token),
                    chosen, f"_hybrid{options.block_size}", heads)


def pattern_values(patterns: HeadPatterns) -> dict[str, Tensor]:
    """The three pattern tensors by label."""
    return dict(zip(PATTERN_TENSORS, (patterns.diagonals, patterns.columns, patterns.corner)))
