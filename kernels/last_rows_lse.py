"""Log-sum-exp of the attention scores of the last query block, per key block: the exact-mass input of the
adaptive estimator (``kernels/block_estimates.py``).

For each of the last ``R`` queries of every head (:func:`exact_query_rows`: the last query block, and the
whole block before it when the last one is ragged) and each key block ``n``, the log-sum-exp of its scaled
scores against the block's keys (``-inf`` where it sees none of them). The Triton kernel computes ``Q K^T``
tile by tile and reduces it in registers, so the ``[.., R, Lk]`` scores never reach memory: at 32K on an H200
it takes 0.19 ms, where a matmul plus an Inductor reduction took 1.5 ms of the plan's 2.5 ms.
:func:`last_rows_block_lse_reference` is the plain-PyTorch definition, used on devices without the kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .block_sparse_launch import dot_options
from .launch_common import interpreting, next_power_of_2
from .constants import LN2, LOG2E, MAX_HEAD_DIM, SUPPORTED_DTYPES
from .lean_op import lean_op

ROWS_PER_PROGRAM = 64  # query rows (of one KV head's group) per program


def exact_query_rows(q_len: int, block_size: int) -> int:
    """How many trailing queries get exact scores: the last query block's, and when that block is ragged the
    whole block before it too, so a question split over the two blocks is exact in both (at most
    ``2 * block_size - 1``, never more than ``q_len``)."""
    tail = q_len % block_size
    return min(q_len, block_size + tail) if tail else min(q_len, block_size)


def last_rows_block_lse_reference(query: Tensor, key: Tensor, block_size: int, is_causal: bool,
                                  scale: float) -> Tensor:
    """float32 ``[B, KVH, G * R, Nk]`` from query ``[B, H, Lq, E]`` and key ``[B, KVH, Lk, E]`` (``G = H /
    KVH``, ``R = exact_query_rows(Lq, block_size)``; row ``g * R + r`` is query ``Lq - R + r`` of head
    ``kvh * G + g``). SDPA's ``is_causal``: query ``i`` sees keys up to ``i``."""
    batch, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[-2]
    rows, group = exact_query_rows(q_len, block_size), heads // kv_heads
    last_q = query[:, :, q_len - rows:].reshape(batch, kv_heads, group * rows, dim)
    scores = torch.matmul(last_q, key.transpose(-1, -2))
    if is_causal:
        q_pos = torch.arange(q_len - rows, q_len, device=query.device).repeat(group)[:, None]
        scores = scores.masked_fill(torch.arange(kv_len, device=query.device)[None, :] > q_pos, float("-inf"))
    # Whole blocks as a view, the ragged tail apart: no padded copy.
    whole = kv_len // block_size * block_size
    lse = (scores[..., :whole].unflatten(-1, (whole // block_size, block_size)).to(torch.float32)
           * scale).logsumexp(-1)
    if whole < kv_len:
        tail = (scores[..., whole:].to(torch.float32) * scale).logsumexp(-1, keepdim=True)
        lse = torch.cat([lse, tail], dim=-1)
    return lse


@triton.jit
def _last_rows_block_lse_kernel(
    Q, K, Out,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_ob, stride_oh, stride_om,
    q_len, kv_len, rows, group, kv_heads, scale_log2,
    IS_CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    block = tl.program_id(0)
    row_tile = tl.program_id(1)
    batch, kv_head = tl.program_id(2) // kv_heads, tl.program_id(2) % kv_heads
    out_row = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)  # g * R + r
    row_ok = out_row < group * rows
    q_head = kv_head * group + out_row // rows
    q_pos = q_len - rows + out_row % rows
    dims = tl.arange(0, DIM_PAD)
    q = tl.load(Q + batch * stride_qb + q_head[:, None] * stride_qh + q_pos[:, None] * stride_qm + dims[None, :],
                mask=row_ok[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
    k_pos = block * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.load(K + batch * stride_kb + kv_head * stride_kh + k_pos[:, None] * stride_kn + dims[None, :],
                mask=(k_pos[:, None] < kv_len) & (dims[None, :] < HEAD_DIM), other=0.0)
    if UPCAST:  # the CPU interpreter's tl.dot mishandles bfloat16 (as in block_sparse_kernel.py)
        q, k = q.to(tl.float32), k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # base 2: exp2 is the fast path
    seen = k_pos[None, :] < kv_len
    if IS_CAUSAL:
        seen = seen & (k_pos[None, :] <= q_pos[:, None])
    s = tl.where(seen, s, float("-inf"))
    peak = tl.max(s, axis=1)
    safe = tl.where(peak == float("-inf"), 0.0, peak)
    total = tl.sum(tl.exp2(s - safe[:, None]), axis=1)
    total = tl.where(peak == float("-inf"), 1.0, total)  # a row that sees no key of the block: -inf below
    lse = tl.where(peak == float("-inf"), float("-inf"), (safe + tl.log2(total)) * LN2)
    tl.store(Out + batch * stride_ob + kv_head * stride_oh + out_row * stride_om + block, lse, mask=row_ok)


def kernel_runs(query: Tensor, block_size: int) -> bool:
    """Whether :func:`last_rows_block_lse` runs the Triton kernel for these inputs (CUDA, or the CPU
    interpreter in tests; a power-of-two block of at least 16 keys; a head dim the tiles hold)."""
    return ((query.is_cuda or interpreting()) and block_size >= 16 and block_size & (block_size - 1) == 0
            and query.shape[-1] <= MAX_HEAD_DIM and query.dtype in SUPPORTED_DTYPES)


def last_rows_block_lse(query: Tensor, key: Tensor, block_size: int, is_causal: bool, scale: float) -> Tensor:
    """float32 ``[B, KVH, G * R, Nk]``: see :func:`last_rows_block_lse_reference` (the same values), through
    the ``dam::last_rows_block_lse`` kernel op where it runs."""
    if kernel_runs(query, block_size):
        return last_rows_block_lse_op(query, key, block_size, is_causal, scale)
    return last_rows_block_lse_reference(query, key, block_size, is_causal, scale)


# An op, so that compiled callers (the dynamic plan, compiled with dynamic shapes) treat the launch as one
# opaque call with concrete sizes, and exporters can decompose it into the reference.
@lean_op("dam::last_rows_block_lse")
def last_rows_block_lse_op(query: Tensor, key: Tensor, block_size: int, is_causal: bool, scale: float) -> Tensor:
    """The Triton kernel; ``query [B, H, Lq, E]``, ``key [B, KVH, Lk, E]`` -> float32 ``[B, KVH, G * R, Nk]``."""
    return launch_last_rows_block_lse(query, key, block_size, is_causal, scale)


def launch_last_rows_block_lse(query: Tensor, key: Tensor, block_size: int, is_causal: bool,
                               scale: float) -> Tensor:
    """The kernel's launch, for callers already inside an op (no second dispatch: host time counts)."""
    query = query if query.stride(-1) == 1 else query.contiguous()
    key = key if key.stride(-1) == 1 else key.contiguous()
    batch, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[-2]
    rows, group = exact_query_rows(q_len, block_size), heads // kv_heads
    nk = (kv_len + block_size - 1) // block_size
    out = torch.empty((batch, kv_heads, group * rows, nk), device=query.device, dtype=torch.float32)
    grid = (nk, (group * rows + ROWS_PER_PROGRAM - 1) // ROWS_PER_PROGRAM, batch * kv_heads)
    _last_rows_block_lse_kernel[grid](
        query, key, out,
        query.stride(0), query.stride(1), query.stride(2),
        key.stride(0), key.stride(1), key.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        q_len, kv_len, rows, group, kv_heads, scale * LOG2E.value,
        IS_CAUSAL=is_causal, BLOCK_N=block_size, BLOCK_M=ROWS_PER_PROGRAM, HEAD_DIM=dim,
        DIM_PAD=max(16, next_power_of_2(dim)), **dot_options(query.dtype),
        num_warps=4, num_stages=2,
    )
    return out


@last_rows_block_lse_op.register_fake
def _(query, key, block_size, is_causal, scale):
    batch, heads, q_len = query.shape[:3]
    kv_heads, kv_len = key.shape[1], key.shape[-2]
    rows = exact_query_rows(q_len, block_size)
    return query.new_empty((batch, kv_heads, heads // kv_heads * rows, (kv_len + block_size - 1) // block_size),
                           dtype=torch.float32)
