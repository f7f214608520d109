"""Attention kernels of dam-compile: the block-sparse plan, its PyTorch reference and the custom ops.

Importing this package registers ``torch.ops.dam.*``.

This file is the package module itself, loaded as ``dam_compile.kernels`` by ``dam_compile/__init__.py``. The folder
has no ``__init__.py`` on purpose: a clone's root on ``sys.path`` must not make it a top-level ``kernels``
(HuggingFace's hub-kernels package is ``kernels``, and transformers imports it).
"""

from .block_sparse_launch import KernelConfig, triton_block_sparse_attention
from .dispatch import DenseAttentionWarning, reset_runtime_stats, runtime_stats
from .ops import sparse_attention
from .plan import PATTERN_PAD, BlockSparsePlan, PlanError, num_blocks
from .reference import block_sparse_attention_reference, plan_density, token_mask
from .structured_plans import causal_block_tables, dense_plan, fixed_count_plan, random_plan, streaming_plan
from .token_pattern import pattern_bitmaps

__all__ = [
    "BlockSparsePlan",
    "DenseAttentionWarning",
    "KernelConfig",
    "PATTERN_PAD",
    "PlanError",
    "block_sparse_attention_reference",
    "causal_block_tables",
    "dense_plan",
    "fixed_count_plan",
    "num_blocks",
    "pattern_bitmaps",
    "plan_density",
    "random_plan",
    "reset_runtime_stats",
    "runtime_stats",
    "sparse_attention",
    "streaming_plan",
    "token_mask",
    "triton_block_sparse_attention",
]
