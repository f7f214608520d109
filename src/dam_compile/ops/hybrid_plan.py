"""The hybrid plan of a calibrated site whose profile marks some query heads dynamic (retrieval heads: no fixed
pattern finds what they look up). Those heads take the dynamic DAM plan (``dam::dynamic_plan``), the others
the calibrated pattern plan (``dam::pattern_plan``); ``dam::hybrid_plan`` merges the two into one
:class:`BlockSparsePlan` layout.

The token-exact pattern the sparse op also receives applies inside the *partial* blocks of every head (see
:mod:`.plan`), so for dynamic heads it must let every causal key of a partial block through.
:func:`hybrid_token_pattern` gives them the diagonals ``0 .. block_size - 1``, no columns and an all-true
corner: the dynamic plan's partial blocks are the causal-diagonal blocks, whose causally visible pairs have
offsets ``i - j`` in exactly that range (without ``is_causal`` its blocks are all full, and no pattern applies).
Pattern heads keep their own diagonals, columns and corner.

Plain PyTorch, no host sync, symbolic-shape safe. The dynamic plan is computed for all heads and the pattern
heads' rows dropped: the dynamic estimate is block-level work, small next to the attention, and selecting
heads first would copy the key heads they share under GQA.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import attention as _ops  # noqa: F401  (registers dam::pattern_plan and dam::dynamic_plan)
from dam_compile.plan.dam_patterns import HeadPatterns
from dam_compile.kernels.lean_op import lean_op
from dam_compile.plan.block_plan import PATTERN_PAD, num_blocks

PlanTensors = tuple[Tensor, Tensor, Tensor, Tensor]


def hybrid_token_pattern(patterns: HeadPatterns, dynamic_heads: Tensor, block_size: int) -> HeadPatterns:
    """``patterns`` (``[H, R]``, ``[H, C]``, ``[H, P, P]``) with the rows of ``dynamic_heads`` (bool ``[H]``)
    replaced by the pass-through pattern described in the module docstring; diagonals come out
    ``[H, max(R, block_size)]``."""
    dynamic = dynamic_heads.to(device=patterns.diagonals.device, dtype=torch.bool)
    if dynamic.shape != (patterns.diagonals.shape[0],):
        raise ValueError(f"dynamic_heads must be a bool [H={patterns.diagonals.shape[0]}] tensor, got "
                         f"{tuple(dynamic_heads.shape)}")
    width = max(patterns.diagonals.shape[1], block_size)
    diagonals = F.pad(patterns.diagonals, (0, width - patterns.diagonals.shape[1]), value=PATTERN_PAD)
    band = F.pad(torch.arange(block_size, dtype=torch.int32, device=dynamic.device), (0, width - block_size),
                 value=PATTERN_PAD)
    diagonals = torch.where(dynamic[:, None], band, diagonals)
    columns = patterns.columns.masked_fill(dynamic[:, None], PATTERN_PAD)
    corner = patterns.corner | dynamic[:, None, None]
    return HeadPatterns(diagonals.contiguous(), columns.contiguous(), corner.contiguous())


def merge_plans(pattern: PlanTensors, dynamic: PlanTensors, dynamic_heads: Tensor) -> PlanTensors:
    """Per head, the dynamic plan's lists where ``dynamic_heads [H]`` is true, else the pattern plan's.

    ``pattern``: counts ``[1 or B, H, Mq]`` and indices ``[1 or B, H, Mq, Wp]`` (both pairs); ``dynamic``:
    ``[B, H, Mq]`` / ``[B, H, Mq, Wd]``. Returns ``[B, H, Mq]`` / ``[B, H, Mq, max(Wp, Wd)]`` (index slots past
    a count are never read; padding with 0 keeps the lists valid)."""
    merged = []
    for p, d in zip(pattern, dynamic):
        if d.dim() == 4:
            width = torch.sym_max(p.shape[-1], d.shape[-1])
            p, d = F.pad(p, (0, width - p.shape[-1])), F.pad(d, (0, width - d.shape[-1]))
        pick = dynamic_heads.to(device=d.device, dtype=torch.bool).view(1, -1, *([1] * (d.dim() - 2)))
        merged.append(torch.where(pick, d, p).to(torch.int32))
    return tuple(merged)


@lean_op("dam::hybrid_plan")
def hybrid_plan_op(
    query: Tensor, key: Tensor, diagonals: Tensor, columns: Tensor, corner: Tensor, dynamic_heads: Tensor,
    block_size: int, is_causal: bool, min_seq_len: int, kernel: str, scale: Optional[float], tau: float,
    box_cox_lambda: float, mu: float, density: float, mass_target: float, sink_blocks: int, local_blocks: int,
    estimator: str,
) -> PlanTensors:
    """The hybrid plan of a ``[B, H, Lq, E]`` query against ``[B, KVH, Lk, E]`` keys: lists ``[B, H, Mq]`` /
    ``[B, H, Mq, Nk]``. ``diagonals``/``columns``/``corner``: the module's patterns (pass them through
    :func:`hybrid_token_pattern`, as the sparse op's token pattern must be); ``dynamic_heads``: bool ``[H]``;
    the scalars are those of ``dam::pattern_plan`` and ``dam::dynamic_plan``. When the attention runs dense
    both plans keep nothing, and so does this one."""
    common = dict(block_size=block_size, is_causal=is_causal, min_seq_len=min_seq_len, kernel=kernel)
    pattern = torch.ops.dam.pattern_plan(query, key, diagonals, columns, corner, **common)
    dynamic = torch.ops.dam.dynamic_plan(
        query, key, **common, scale=scale, tau=tau, box_cox_lambda=box_cox_lambda, mu=mu, density=density,
        mass_target=mass_target, sink_blocks=sink_blocks, local_blocks=local_blocks, estimator=estimator,
    )
    return merge_plans(pattern, dynamic, dynamic_heads)


@hybrid_plan_op.register_fake
def _(query, key, diagonals, columns, corner, dynamic_heads, block_size, *args) -> PlanTensors:
    batch, heads = query.shape[:2]
    mq, nk = num_blocks(query.shape[-2], block_size), num_blocks(key.shape[-2], block_size)
    counts = query.new_empty((batch, heads, mq), dtype=torch.int32)
    indices = query.new_empty((batch, heads, mq, nk), dtype=torch.int32)
    return counts, indices, torch.empty_like(counts), torch.empty_like(indices)


__all__ = ["hybrid_plan_op", "hybrid_token_pattern", "merge_plans"]
