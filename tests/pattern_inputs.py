"""DAM head patterns that the pattern tests share (``plan/test_dam_patterns.py``, ``plan/test_pattern_plan.py``,
``plan/test_token_pattern.py``)."""

from __future__ import annotations

import torch

from dam_compile.plan.block_plan import PATTERN_PAD
from dam_compile.plan.dam_patterns import HeadPatterns, match_patterns, true_mask


def listed(row: torch.Tensor) -> list[int]:
    """The used entries of a padded pattern list."""
    return [int(x) for x in row if x != PATTERN_PAD]


def random_patterns(heads: int, pcl: int, causal: bool, seed: int) -> HeadPatterns:
    """Patterns matched on a random (causal: lower-triangular) attention map at capture length ``pcl``."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(heads, pcl, pcl, generator=g) ** 4
    return match_patterns(true_mask(a.tril() if causal else a, 0.5, 0.3), 0.5, causal)
