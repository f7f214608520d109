"""Host side of the Hopper path (:mod:`.hopper_block_sparse_kernel`): whether a call can take it, its TMA
descriptors, and the launch.

The tile shape is fixed (FlashAttention-3's for head dims 64 and 128: 128 query rows split over two consumer
warpgroups, 128-key tiles, two K/V stages), so nothing is autotuned and nothing is decided per call but the
constexprs the call's features set.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
from torch import Tensor
from triton.runtime import _allocation, driver

from .launch_cache import CachedLaunch, LaunchCache, tensors_key
from .common import (
    CallShape,
    capability,
    cdiv,
    interpreting,
    plan_lists,
    sm_count,
    softmax_scale,
    tma_aligned,
)
from dam_compile.plan.block_plan import BlockSparsePlan
from .stream_buffers import COUNTERS, StreamBuffers

try:  # Gluon ships with Triton >= 3.5; without it only the portable kernel runs.
    from triton.experimental.gluon import language as gl

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
        Q=query, q_strides=query.stride(), K=key, k_strides=key.stride(), V=value, v_strides=value.stride(),
        Out=out, o_strides=out.stride(), Lse=lse, partial_lists=partial, full_lists=full,
        KvRange=query if kv_range is None else kv_range, heads=shape.heads, group=shape.heads // shape.kv_heads,
        q_len=shape.q_len, kv_len=shape.kv_len, q_offset=q_offset,
        sm_scale=float(softmax_scale(scale, shape.head_dim)),  # float: Triton types an int i32
        n_bh=shape.batch * shape.heads, n_tiles=cdiv(shape.q_len, CONSUMERS * BLOCK_M),
        Sched=_scheduler(query.device),
    )


def hopper_constants(dtype: torch.dtype, plan: BlockSparsePlan, shape: CallShape, kv_range: Tensor | None,
                     is_causal: bool, return_lse: bool) -> dict[str, object]:
    """The kernel's constexprs and launch options."""
    return dict(
        HEAD_DIM=shape.head_dim, PLAN_BLOCK=plan.block_size, IS_CAUSAL=is_causal, HAS_FULL=plan.has_full_blocks,
        HAS_KV_RANGE=kv_range is not None, WRITE_LSE=return_lse, NUM_STAGES=NUM_STAGES, BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N, Q_LAYOUT=_shared_layout(dtype, BLOCK_M, shape.head_dim),
        KV_LAYOUT=_shared_layout(dtype, BLOCK_N, shape.head_dim), num_warps=4, maxnreg=MAX_REGISTERS,
    )


def launch_hopper(args: dict[str, object], constants: dict[str, object], device: torch.device,
                  persistent: bool = True, cache_key: tuple | None = None) -> None:
    """One CTA per SM taking work items in order from the scheduler's counter (``persistent``), or one per item.
    With a ``cache_key`` (:func:`call_key`) the compiled kernel and this call's arguments are kept for
    :func:`launch_kept`."""
    items = args["n_bh"] * args["n_tiles"]
    grid = (min(sm_count(device), items) if persistent else items,)
    ensure_scratch_allocator()
    if cache_key is None or _LAUNCHES is None:
        hopper_block_sparse_fwd[grid](**args, **constants)
        return
    partial, full = args["partial_lists"], args["full_lists"]
    _LAUNCHES.launch(cache_key, grid, {**args, **constants}, ((partial[1], partial[3]), (full[1], full[3])))


# The arguments that change between repeat calls of one site (the rest is fixed by call_key).
PER_CALL = ("Q", "K", "V", "Out", "Lse", "partial_lists", "full_lists", "KvRange", "Sched")
_LAUNCHES = LaunchCache(hopper_block_sparse_fwd, PER_CALL) if hopper_block_sparse_fwd is not None else None


class CallFlags(NamedTuple):
    """A call's settings besides its tensors (see :func:`triton_block_sparse_attention`)."""

    block_size: int
    q_offset: int
    scale: float | None
    is_causal: bool
    enable_gqa: bool
    return_lse: bool


def call_key(query: Tensor, key: Tensor, value: Tensor, lists: tuple[Tensor | None, ...], kv_range: Tensor | None,
             flags: CallFlags) -> tuple | None:
    """What fixes a call's checks, routing, compiled kernel and every argument but its tensors' addresses, for a
    call without mask tensor, token pattern or ``out`` buffer (``lists``: the plan's ``kv_num_blocks``,
    ``kv_indices``, ``full_kv_num_blocks``, ``full_kv_indices``, the last two ``None`` without full blocks);
    ``None`` off CUDA or when a tensor is not 16-byte aligned (such calls are neither kept nor served). Equal
    keys: the first call's checks and routing hold for the second."""
    device = query.get_device()
    if device < 0 or _LAUNCHES is None or not _is_hopper(device):
        return None
    counts, indices, full_counts, full_indices = lists
    tensors = (query, key, value, counts, indices) if full_counts is None else (
        query, key, value, counts, indices, full_counts, full_indices)
    if kv_range is not None:
        tensors += (kv_range,)
    per_tensor = tensors_key(*tensors)
    return None if per_tensor is None else (device, flags, kv_range is None, per_tensor)


@functools.lru_cache(maxsize=None)
def _is_hopper(device_index: int) -> bool:
    return capability(torch.device("cuda", device_index))[0] == 9


def launch_kept(query: Tensor, key: Tensor, value: Tensor, lists: tuple[Tensor | None, ...],
                kv_range: Tensor | None, flags: CallFlags) -> Tensor | tuple[Tensor, Tensor] | None:
    """A repeat of a call that took the Hopper path (same :func:`call_key`), run through the launch kept for it
    with new output buffers and this call's tensors; ``None`` (nothing launched) for any other call."""
    entry = kept_launch(call_key(query, key, value, lists, kv_range, flags))
    return None if entry is None else run_kept(entry, query, key, value, lists, kv_range, flags)


def kept_launch(cache_key: tuple | None) -> CachedLaunch | None:
    """The launch kept for ``cache_key`` (:func:`call_key`), if a call with it took the Hopper path before."""
    return None if cache_key is None else _LAUNCHES.get(cache_key)


def run_kept(entry: CachedLaunch, query: Tensor, key: Tensor, value: Tensor, lists: tuple[Tensor | None, ...],
             kv_range: Tensor | None, flags: CallFlags) -> Tensor | tuple[Tensor, Tensor]:
    """Run a call through its kept launch: new output buffers, this call's tensors, the plan's list tensors with
    the strides worked out for the key."""
    (partial_strides, partial_rows), (full_strides, full_rows) = entry.extra
    counts, indices, full_counts, full_indices = lists
    out = query.new_empty(query.shape)
    lse = query.new_empty(query.shape[:3], dtype=torch.float32) if flags.return_lse else out
    partial = (counts, partial_strides, indices, partial_rows)
    full = partial if full_counts is None else (full_counts, full_strides, full_indices, full_rows)
    device = query.get_device()
    stream = driver.active.get_current_stream(device)
    ensure_scratch_allocator()
    entry(query, key, value, out, lse, partial, full, query if kv_range is None else kv_range,
          COUNTERS.get(device, stream, _SCHEDULER_SLOTS), stream=stream)
    return (out, lse) if flags.return_lse else out


def ensure_scratch_allocator() -> None:
    """The kernel makes its TMA descriptors in global scratch memory, which Triton asks an allocator for at
    launch: a user's allocator is kept, else one from PyTorch's caching allocator is set (per thread context,
    as Triton keeps it)."""
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def _scratch(size: int, alignment: int, stream: int | None) -> Tensor:
    """Triton's global scratch for a launch: the stream's buffer, grown as asked (a kernel only uses its scratch
    while it runs; the caching allocator's blocks are 512-byte aligned, Triton asks for at most 128). Saves an
    allocation per launch."""
    return _SCRATCH.get(torch.cuda.current_device(), stream, size)


_SCRATCH = StreamBuffers(torch.int8, zeroed=False)


def _scheduler(device: torch.device) -> Tensor:
    """The persistent grid's counter, int32 ``[next item, CTAs done]``: the first two of the current stream's
    :data:`COUNTERS`. The kernel's last CTA zeroes it, so no launch resets it."""
    if device.type != "cuda":  # compiled only (benchmarks/kernel_resources.py): nothing runs, nothing is shared
        return torch.zeros(_SCHEDULER_SLOTS, dtype=torch.int32, device=device)
    return COUNTERS.get(device.index, driver.active.get_current_stream(device.index), _SCHEDULER_SLOTS)


_SCHEDULER_SLOTS = 2  # the persistent grid's counters: next item, CTAs done


@functools.lru_cache(maxsize=None)
def _shared_layout(dtype: torch.dtype, rows: int, head_dim: int) -> "gl.NVMMASharedLayout":
    """The shared-memory layout of a TMA box of ``rows`` rows of one head (looked up once: it costs more host
    time than a launch)."""
    return gl.NVMMASharedLayout.get_default_for([1, 1, rows, head_dim],
                                                gl.float16 if dtype == torch.float16 else gl.bfloat16)
