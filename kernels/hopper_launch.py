"""Host side of the Hopper path (:mod:`.hopper_block_sparse_kernel`): whether a call can take it, its TMA
descriptors, and the launch.

The tile shape is fixed (FlashAttention-3's for head dims 64 and 128: 128 query rows split over two consumer
warpgroups, 128-key tiles, two K/V stages), so nothing is autotuned and nothing is decided per call but the
constexprs the call's features set.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .launch_common import (CallShape, capability, cdiv, interpreting, plan_lists, sm_count, softmax_scale,
                            tma_aligned)
from .plan import BlockSparsePlan

try:  # Gluon ships with Triton >= 3.5; without it only the portable kernel runs.
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from .hopper_block_sparse_kernel import CONSUMERS as _CONSUMERS, hopper_block_sparse_fwd
    CONSUMERS = _CONSUMERS.value
except ImportError:  # pragma: no cover - older Triton
    hopper_block_sparse_fwd = None

BLOCK_M = 64  # query rows per consumer warpgroup (one wgmma row group of 4 warps x 16)
BLOCK_N = 128  # keys per tile
NUM_STAGES = 2  # K/V tiles in flight: 2 Q slots (64 KB) + 2 x (K + V) (128 KB) of shared memory
HEAD_DIMS = (64, 128)
# Registers per thread of the launch (12 warps: 2 consumer warpgroups + the loader's warpgroup): 168 x 384 threads
# fit the SM's 65536; the loader then gives its share to the consumers (240 each).
MAX_REGISTERS = 168


def hopper_unsupported(query: Tensor, key: Tensor, value: Tensor, plan: BlockSparsePlan,
                       attn_mask: Tensor | None) -> str | None:
    """Why the Hopper path cannot take this call, or ``None`` when it can."""
    if hopper_block_sparse_fwd is None:
        return "this Triton has no Gluon"
    if interpreting() or not query.is_cuda:
        return "not on a CUDA GPU"
    if capability(query.device)[0] != 9:
        return f"compute capability {capability(query.device)} is not Hopper's 9.x"
    if query.dtype not in (torch.float16, torch.bfloat16):
        return f"{query.dtype} (needs float16 or bfloat16)"
    if query.shape[-1] not in HEAD_DIMS:
        return f"head dim {query.shape[-1]} (needs one of {HEAD_DIMS})"
    if attn_mask is not None:
        return "an attention-mask tensor"
    if plan.has_token_pattern:
        return "a token pattern"
    if plan.block_size % (CONSUMERS * BLOCK_M) or plan.block_size % BLOCK_N:
        return f"plan block_size {plan.block_size} (needs a multiple of {max(CONSUMERS * BLOCK_M, BLOCK_N)})"
    if not all(tma_aligned(t) for t in (query, key, value)):
        return "Q/K/V strides that TMA cannot address (contiguous last dim, 16-byte aligned strides)"
    return None


def hopper_args(query: Tensor, key: Tensor, value: Tensor, out: Tensor, lse: Tensor, plan: BlockSparsePlan,
                shape: CallShape, kv_range: Tensor | None, q_offset: int, scale: float | None) -> dict[str, object]:
    """The kernel's non-constexpr arguments by name (see :func:`hopper_block_sparse_fwd`)."""
    partial, full = plan_lists(plan, shape)
    return dict(
        desc_q=_descriptor(query, BLOCK_M), desc_k=_descriptor(key, BLOCK_N), desc_v=_descriptor(value, BLOCK_N),
        Out=out, o_strides=out.stride(), Lse=lse, partial_lists=partial, full_lists=full,
        KvRange=query if kv_range is None else kv_range, heads=shape.heads, group=shape.heads // shape.kv_heads,
        q_len=shape.q_len, kv_len=shape.kv_len, q_offset=q_offset,
        sm_scale=softmax_scale(scale, shape.head_dim),
        n_bh=shape.batch * shape.heads, n_tiles=cdiv(shape.q_len, CONSUMERS * BLOCK_M),
        Sched=_scheduler(query.device),
    )


def hopper_constants(plan: BlockSparsePlan, shape: CallShape, kv_range: Tensor | None, is_causal: bool,
                     return_lse: bool) -> dict[str, object]:
    """The kernel's constexprs and launch options."""
    return dict(
        HEAD_DIM=shape.head_dim, PLAN_BLOCK=plan.block_size, IS_CAUSAL=is_causal, HAS_FULL=plan.has_full_blocks,
        HAS_KV_RANGE=kv_range is not None, WRITE_LSE=return_lse, NUM_STAGES=NUM_STAGES, BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N, num_warps=4, maxnreg=MAX_REGISTERS,
    )


def launch_hopper(args: dict[str, object], constants: dict[str, object], device: torch.device,
                  persistent: bool = True) -> None:
    """One CTA per SM taking work items in order from the scheduler's counter (``persistent``), or one per item."""
    items = args["n_bh"] * args["n_tiles"]
    grid = (min(sm_count(device), items) if persistent else items,)
    hopper_block_sparse_fwd[grid](**args, **constants)


def _scheduler(device: torch.device) -> Tensor:
    """The persistent grid's counter, int32 ``[next item, CTAs done]``: one per device and stream (launches on
    one stream never overlap; the kernel's last CTA zeroes it, so no launch resets it)."""
    if device.type != "cuda":  # compiled only (benchmarks/kernel_resources.py): nothing runs, nothing is shared
        return torch.zeros(2, dtype=torch.int32, device=device)
    key = (device, torch.cuda.current_stream(device).cuda_stream)
    counter = _SCHEDULERS.get(key)
    if counter is None:
        counter = _SCHEDULERS[key] = torch.zeros(2, dtype=torch.int32, device=device)
    return counter


_SCHEDULERS: dict[tuple, Tensor] = {}


def _descriptor(t: Tensor, rows: int) -> "TensorDescriptor":
    """A TMA descriptor of a ``[B, heads, L, E]`` operand whose box is ``rows`` rows of one head (the layout is
    looked up once per dtype and shape: building it costs more host time than the launch)."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, t.shape[-1]],
                            _shared_layout(t.dtype, rows, t.shape[-1]))


@functools.lru_cache(maxsize=None)
def _shared_layout(dtype: torch.dtype, rows: int, head_dim: int) -> "gl.NVMMASharedLayout":
    return gl.NVMMASharedLayout.get_default_for([1, 1, rows, head_dim],
                                                gl.float16 if dtype == torch.float16 else gl.bfloat16)
