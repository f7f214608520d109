"""Which mask-generation op a site calls, with which tensors and arguments: one decision shared by the graph
pass (which inserts the call) and everything that builds a plan outside the graph (the eager oracles, the site
measures, the answer check, the context-parallel ring, the benchmarks), so they cannot drift apart.

By source (see :mod:`.insert_mask`): ``dam::dynamic_plan``, ``dam::dense_plan``, ``dam::streaming_plan``;
calibrated: ``dam::pattern_plan`` on the module's patterns, ``dam::hybrid_plan`` when the profile marks some of
its heads dynamic, ``dam::dynamic_plan`` when it marks all; ``dam::decode_plan`` for a one-row query.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from dam_compile.ops import attention as _ops  # noqa: F401  (registers torch.ops.dam.*)
from dam_compile.plan.block_plan import BlockSparsePlan
from dam_compile.plan.dam_patterns import HeadPatterns
from dam_compile.ops.hybrid_plan import hybrid_token_pattern
from dam_compile.plan.mask_options import MaskOptions
from .profile_protocol import SiteProfile

DYNAMIC_PLAN = torch.ops.dam.dynamic_plan.default
PATTERN_PLAN = torch.ops.dam.pattern_plan.default
DENSE_PLAN = torch.ops.dam.dense_plan.default
STREAMING_PLAN = torch.ops.dam.streaming_plan.default
HYBRID_PLAN = torch.ops.dam.hybrid_plan.default
DECODE_PLAN = torch.ops.dam.decode_plan.default
MASK_GENERATORS: dict[str, Callable[..., Any]] = {
    "dynamic": DYNAMIC_PLAN, "calibrated": PATTERN_PLAN, "dense": DENSE_PLAN, "streaming": STREAMING_PLAN,
}
PATTERN_TENSORS = ("diagonals", "columns", "corner")
PATH_ARGS = ("min_seq_len", "kernel")  # the op's run-time path choice (ops/dispatch.py), not the planner's


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

    def plan(self, lists: Sequence[Tensor]) -> BlockSparsePlan:
        """The plan of the lists :meth:`run` returned; a prefill plan carries its token pattern."""
        token = () if self.decode else tuple(self.patterns.values())
        return BlockSparsePlan(*lists[:2], self.kwargs["block_size"], *lists[2:], *token)

    @property
    def token_pattern(self) -> HeadPatterns | None:
        """A prefill call's token pattern (what the sparse op gets), or ``None``."""
        return None if self.decode or not self.patterns else HeadPatterns(*self.patterns.values())

    @property
    def planner_kwargs(self) -> dict[str, Any]:
        """``kwargs`` without the op's path choice: what the planner function itself takes."""
        return {name: value for name, value in self.kwargs.items() if name not in PATH_ARGS}

    def dynamic_call(self) -> PlanCall:
        """The dynamic plan of a dynamic or hybrid prefill call (the hybrid plan computes it for its dynamic heads,
        with the same arguments)."""
        if self.op not in (DYNAMIC_PLAN, HYBRID_PLAN):
            raise ValueError(f"{self.op} computes no dynamic plan")
        return PlanCall(DYNAMIC_PLAN, False, self.kwargs)


def one_row(query: Any) -> bool:
    """A query (tensor or fake tensor) of statically one row: a decode step (Dynamo specialises a length of 1)."""
    length = query.shape[-2]
    return isinstance(length, int) and length == 1


def plan_call(
    options: MaskOptions, query: Any, *, is_causal: bool, scale: Any, profile: SiteProfile | None = None,
    entry: str | None = None,
) -> PlanCall:
    """The call for a site's ``query`` (a tensor, or the fake tensor a graph node stands for: one row is a decode
    step, and the calibrated patterns go to its device). ``profile`` and ``entry`` (the profile's module name for
    the site): the calibrated source's, required for it and ignored otherwise."""
    decode = one_row(query)
    if options.source != "calibrated":
        if decode:
            return PlanCall(DECODE_PLAN, True, options.decode_plan_kwargs(scale))
        return PlanCall(MASK_GENERATORS[options.source], False, options.prefill_plan_kwargs(is_causal, scale))
    if profile is None or entry is None:
        raise ValueError("profile and entry: the calibrated source plans from the patterns and dynamic heads of the "
                         "site's module in the profile")
    patterns = profile.patterns_on(entry, query.device)
    dynamic = profile.modules[entry].dynamic_heads.to(device=query.device, dtype=torch.bool)
    heads = tuple(int(h) for h in dynamic.nonzero().flatten().tolist())
    chosen = {"dynamic_heads": dynamic} if heads else {}
    if decode:
        values = dict(diagonals=patterns.diagonals, columns=patterns.columns)
        return PlanCall(DECODE_PLAN, True, options.decode_plan_kwargs(scale), values, chosen, dynamic_heads=heads)
    if len(heads) == dynamic.numel():  # every head dynamic: no pattern left to apply
        return PlanCall(DYNAMIC_PLAN, False, options.dynamic_plan_kwargs(is_causal, scale), dynamic_heads=heads)
    if not heads:
        return PlanCall(PATTERN_PLAN, False, options.dense_plan_kwargs(is_causal),
                        pattern_values(patterns))
    # Some heads dynamic: the token pattern lets their partial blocks through (see ops/hybrid_plan.py).
    token = hybrid_token_pattern(patterns, dynamic, options.block_size)
    return PlanCall(HYBRID_PLAN, False, options.dynamic_plan_kwargs(is_causal, scale), pattern_values(token),
                    chosen, f"_hybrid{options.block_size}", heads)


def pattern_values(patterns: HeadPatterns) -> dict[str, Tensor]:
    """The three pattern tensors by label."""
    return dict(zip(PATTERN_TENSORS, (patterns.diagonals, patterns.columns, patterns.corner)))
