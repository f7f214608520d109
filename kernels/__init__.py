"""Attention kernels of dam-compile: the block-sparse plan, its PyTorch reference and the custom ops.

Importing this package registers ``torch.ops.dam.*``.
"""

# This folder installs as dam_compile.kernels. From a source checkout's root, Python also sees it as a top-level
# `kernels`, the name of HF's hub-kernels package, which transformers imports to probe for it. Under any name but
# ours, stay an empty module: importing the ops twice would register torch.ops.dam.* twice.
if __name__ == "dam_compile.kernels":
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
