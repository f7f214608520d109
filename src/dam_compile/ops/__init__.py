"""The ``torch.ops.dam`` operators the rewritten graph calls, with their fakes and decompositions, and the one
per-call policy that picks the dense or sparse path (``dispatch``). Importing the package registers every op.
"""

from . import attention, hybrid_plan, key_padding, ring_step  # noqa: F401  (registers torch.ops.dam.*)
from .attention import sparse_attention
from .dispatch import DenseAttentionWarning, reset_runtime_stats, runtime_stats

__all__ = ["DenseAttentionWarning", "reset_runtime_stats", "runtime_stats", "sparse_attention"]
