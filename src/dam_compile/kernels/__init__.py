"""Triton and Gluon kernels with their host launchers: block-sparse attention (``block_sparse_kernel`` /
``block_sparse_launch``, the Hopper warp-specialized ``hopper_*``), sparse decode (``decode_kernel``), the
row log-sum-exp the dynamic planners score with (``last_rows_lse``), and what launchers share (``common``,
``constants``, ``launch_cache``, ``stream_buffers``, ``lean_op``). They take tensors and a plan, nothing else.
"""

from .block_sparse_launch import KernelConfig, triton_block_sparse_attention

__all__ = ["KernelConfig", "triton_block_sparse_attention"]
