"""Host-side helpers every kernel launcher shares: the interpreter flag, the device's capability, integer
helpers (``cdiv`` and ``softmax_scale`` are ``plan.arith``'s, re-exported: the plan layer needs them too), the
dot constexprs, a call's sizes and the plan's list operands.

Host time per call matters (hundreds of attention calls per forward): plain-Python helpers instead of Triton's
jit-wrapped ``next_power_of_2`` / ``cdiv``, and the capability looked up once per device.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from dam_compile.plan.arith import cdiv, softmax_scale

if TYPE_CHECKING:
    from dam_compile.plan.block_plan import BlockSparsePlan

# Triton reads TRITON_INTERPRET when a kernel is decorated (at import), so reading it once here agrees with it.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting() -> bool:
    """Whether Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return _INTERPRETING


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def dot_options(dtype: torch.dtype) -> dict[str, object]:
    """The ``DOT_PRECISION`` and ``UPCAST`` constexprs of a kernel whose inputs are ``dtype``: exact float32
    dots for float32, and under the CPU interpreter (whose ``tl.dot`` mishandles bfloat16) bfloat16 upcast to
    float32."""
    upcast = interpreting() and dtype == torch.bfloat16
    return dict(DOT_PRECISION="ieee" if dtype == torch.float32 or upcast else "tf32", UPCAST=upcast)


@functools.lru_cache(maxsize=None)
def capability(device: torch.device) -> tuple[int, int]:
    """``(major, minor)`` compute capability of a CUDA device."""
    return torch.cuda.get_device_capability(device)


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a persistent grid's size)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def tma_aligned(t: Tensor) -> bool:
    """Whether a TMA descriptor can address ``t``: contiguous last dim, 16-byte aligned base and strides."""
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(
        s * t.element_size() % 16 == 0 for s in t.stride()[:-1])


class CallShape(NamedTuple):
    """The sizes of one attention call: query ``[batch, heads, q_len, head_dim]``, K/V ``[batch, kv_heads,
    kv_len, head_dim]``."""

    batch: int
    heads: int
    q_len: int
    head_dim: int
    kv_heads: int
    kv_len: int


def plan_lists(plan: "BlockSparsePlan", shape: CallShape) -> tuple[tuple, tuple]:
    """The kernels' two list operands, ``(partial, full)``, each ``(counts [B, H, Mq], its strides, indices
    [B, H, Mq, K], its first three strides)`` as strided views (stride 0 on broadcast dims); without full blocks
    the full operand repeats the partial one (the kernels never read it)."""
    partial = _list_operand(plan.kv_num_blocks, plan.kv_indices, shape)
    if not plan.has_full_blocks:
        return partial, partial
    return partial, _list_operand(plan.full_kv_num_blocks, plan.full_kv_indices, shape)


def _list_operand(counts: Tensor, indices: Tensor, shape: CallShape) -> tuple:
    mq = counts.shape[-1]
    counts = counts.expand(shape.batch, shape.heads, mq)
    indices = indices.expand(shape.batch, shape.heads, mq, indices.shape[-1])
    return counts, counts.stride(), indices, indices.stride()[:3]


__all__ = ["CallShape", "capability", "cdiv", "dot_options", "interpreting", "next_power_of_2", "plan_lists",
           "sm_count", "softmax_scale", "tma_aligned"]
