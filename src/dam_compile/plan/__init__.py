"""The block-sparse plan and everything computed from it in plain PyTorch: the format (``block_plan``), the fixed
plans (``structured_plans``), DAM's pattern math (``dam_patterns``) and its extension to any length
(``pattern_plan``, ``token_pattern``), the reference attention a kernel is tested against (``reference``),
the plain values a site's plan is built from (``mask_options``) and their defaults (``defaults``), and the
scalar helpers every layer shares (``arith``: ``cdiv``, ``softmax_scale``). The lowest layer: no Triton, no ops.
"""

from .block_plan import PATTERN_PAD, BlockSparsePlan, PlanError, num_blocks
from .reference import block_sparse_attention_reference, plan_density, token_mask
from .structured_plans import causal_block_tables, dense_plan, streaming_plan

__all__ = [
    "BlockSparsePlan",
    "PATTERN_PAD",
    "PlanError",
    "block_sparse_attention_reference",
    "causal_block_tables",
    "dense_plan",
    "num_blocks",
    "plan_density",
    "streaming_plan",
    "token_mask",
]
