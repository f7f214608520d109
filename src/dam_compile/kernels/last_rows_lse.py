"""Log-sum-exp of the attention scores of chosen query rows, per key block: the exact-mass input of the
dynamic estimators (``kernels/block_estimates.py``).

Two row sets: the last query block (:func:`exact_query_rows`: the last query block, and the whole block before
it when the last one is ragged; the adaptive estimator's) and ``per_block`` rows spread evenly over every query
block (:func:`sampled_query_positions`; the sampled estimator's). For each chosen query of every head and each
key block ``n``, the log-sum-exp of its scaled scores against the block's keys (``-inf`` where it sees none of
them). The Triton kernel computes ``Q K^T`` tile by tile and reduces it in registers, so the ``[.., R, Lk]``
scores never reach memory: for the last rows at 32K on an H200 it takes 0.19 ms, where a matmul plus an
Inductor reduction took 1.5 ms of the plan's 2.5 ms. A tile of rows that sees none of a key block (causal)
computes nothing. :func:`rows_block_lse_reference` is the plain-PyTorch definition, used on devices without the
kernel.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import cdiv, dot_options, interpreting, next_power_of_2
from .constants import LN2, LOG2E, MAX_HEAD_DIM, SUPPORTED_DTYPES
from .lean_op import lean_op

ROWS_PER_PROGRAM = 64  # query rows (of one KV head's group) per program
# On the CPU interpreter each program costs its operations' Python overhead whatever its size: fewer, larger
# programs (the sampled rows of a 2K prompt are thousands of 64-row tiles), each over every key block.
INTERPRETER_ROWS_PER_PROGRAM = 512
TRITON_MAX_TENSOR_NUMEL = 2**20  # Triton's limit on the elements of one tensor in a program


def exact_query_rows(q_len: int, block_size: int) -> int:
    """How many trailing queries get exact scores: the last query block's, and when that block is ragged the
    whole block before it too, so a question split over the two blocks is exact in both (at most
    ``2 * block_size - 1``, never more than ``q_len``)."""
    tail = q_len % block_size
    return min(q_len, block_size + tail) if tail else min(q_len, block_size)


def sampled_query_positions(q_len: int, block_size: int, per_block: int) -> Tensor:
    """int64 ``[ceil(q_len / block_size) * per_block]``: ``per_block`` queries of each query block, the last of
    each of its ``per_block`` equal parts (so the block's last query is one; a ragged last block repeats its
    last query). ``per_block`` divides ``block_size``."""
    blocks = _sampled_rows(q_len, block_size, per_block) // per_block
    step = block_size // per_block
    starts = torch.arange(blocks)[:, None] * block_size
    return (starts + torch.arange(1, per_block + 1)[None, :] * step - 1).clamp(max=q_len - 1).flatten()


def rows_block_lse_reference(query: Tensor, key: Tensor, positions: Tensor, block_size: int, is_causal: bool,
                             scale: float, q_rows: Tensor | None = None) -> Tensor:
    """float32 ``[B, KVH, G * R, Nk]`` from query ``[B, H, Lq, E]``, key ``[B, KVH, Lk, E]`` and the ``R``
    query ``positions`` (``G = H / KVH``; row ``g * R + r`` is query ``positions[r]`` of head ``kvh * G + g``).
    SDPA's ``is_causal``: query ``i`` sees keys up to ``i``. ``q_rows``: the query rows to take when they are not
    ``positions`` (a shard of a longer sequence: the rows are the shard's, the positions the sequence's)."""
    batch, heads, _, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[-2]
    group, rows = heads // kv_heads, positions.numel()
    positions = positions.to(query.device)
    q_rows = positions if q_rows is None else q_rows.to(query.device)
    chosen = query[:, :, q_rows].reshape(batch, kv_heads, group * rows, dim)
    scores = torch.matmul(chosen, key.transpose(-1, -2))
    if is_causal:
        q_pos = positions.repeat(group)[:, None]
        scores = scores.masked_fill(torch.arange(kv_len, device=query.device)[None, :] > q_pos, float("-inf"))
    # Whole blocks as a view, the ragged tail apart: no padded copy.
    whole = kv_len // block_size * block_size
    lse = (scores[..., :whole].unflatten(-1, (whole // block_size, block_size)).to(torch.float32)
           * scale).logsumexp(-1)
    if whole < kv_len:
        tail = (scores[..., whole:].to(torch.float32) * scale).logsumexp(-1, keepdim=True)
        lse = torch.cat([lse, tail], dim=-1)
    return lse


def last_rows_block_lse_reference(query: Tensor, key: Tensor, block_size: int, is_causal: bool,
                                  scale: float) -> Tensor:
    """:func:`rows_block_lse_reference` of the last ``R = exact_query_rows(Lq, block_size)`` queries."""
    q_len = query.shape[-2]
    positions = torch.arange(q_len - exact_query_rows(q_len, block_size), q_len)
    return rows_block_lse_reference(query, key, positions, block_size, is_causal, scale)


def sampled_rows_block_lse_reference(query: Tensor, key: Tensor, block_size: int, per_block: int,
                                     is_causal: bool, scale: float, block_map: Tensor | None = None) -> Tensor:
    """:func:`rows_block_lse_reference` of :func:`sampled_query_positions` (``per_block`` rows of every query
    block): ``[B, KVH, G * Mq * per_block, Nk]``. ``block_map`` (int ``[Mq]``): where each query block lies in
    the key sequence (a shard of whole blocks; default: block ``m`` at ``m``)."""
    rows = sampled_query_positions(query.shape[-2], block_size, per_block)
    if block_map is None:
        return rows_block_lse_reference(query, key, rows, block_size, is_causal, scale)
    positions = block_map.to(rows.device)[rows // block_size] * block_size + rows % block_size
    return rows_block_lse_reference(query, key, positions, block_size, is_causal, scale, q_rows=rows)


@triton.jit
def _rows_block_lse_kernel(
    Q, K, Out, BlockMap,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_ob, stride_oh, stride_om,
    q_len, kv_len, rows, group, kv_heads, scale_log2, per_block, nk,
    IS_CAUSAL: tl.constexpr, SAMPLED: tl.constexpr, HAS_MAP: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr, KEY_BLOCKS: tl.constexpr, LOOP_BLOCKS: tl.constexpr, HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # The program's key blocks: LOOP_BLOCKS steps of KEY_BLOCKS blocks (a GPU: steps of one block, the row
    # tile's queries loaded once; the CPU interpreter: one step over up to every block).
    first_block = tl.program_id(0) * KEY_BLOCKS * LOOP_BLOCKS
    row_tile = tl.program_id(1)
    batch, kv_head = tl.program_id(2) // kv_heads, tl.program_id(2) % kv_heads
    out_row = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)  # g * R + r
    row_ok = out_row < group * rows
    q_head = kv_head * group + out_row // rows
    r = out_row % rows
    if SAMPLED:  # sampled_query_positions: the last query of each of a block's per_block parts
        within = (r % per_block + 1) * (BLOCK_N // per_block) - 1
        q_row = tl.minimum((r // per_block) * BLOCK_N + within, q_len - 1)
        if HAS_MAP:  # a shard of whole blocks: its block r // per_block lies at BlockMap[.] among the keys
            q_pos = tl.load(BlockMap + r // per_block, mask=row_ok, other=0) * BLOCK_N + within
        else:
            q_pos = q_row
    else:  # the last `rows` queries
        q_row = q_len - rows + r
        q_pos = q_row
    last_pos = tl.max(tl.where(row_ok, q_pos, -1))
    out = Out + batch * stride_ob + kv_head * stride_oh + out_row * stride_om
    dims = tl.arange(0, DIM_PAD)
    q = tl.load(Q + batch * stride_qb + q_head[:, None] * stride_qh + q_row[:, None] * stride_qm + dims[None, :],
                mask=row_ok[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
    if UPCAST:  # the CPU interpreter's tl.dot mishandles bfloat16 (as in block_sparse_kernel.py)
        q = q.to(tl.float32)
    for step in range(LOOP_BLOCKS):
        block = first_block + step * KEY_BLOCKS
        row_store = row_ok & (out_row * 0 + block < nk)  # a loop may pass the last key block
        # Causal: a tile whose rows all come before the key blocks sees none of them (half the sampled tiles).
        if (not IS_CAUSAL) or (block * BLOCK_N <= last_pos):
            k_pos = block * BLOCK_N + tl.arange(0, KEY_BLOCKS * BLOCK_N)
            k = tl.load(K + batch * stride_kb + kv_head * stride_kh + k_pos[:, None] * stride_kn + dims[None, :],
                        mask=(k_pos[:, None] < kv_len) & (dims[None, :] < HEAD_DIM), other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # base 2: exp2 is the fast path
            seen = k_pos[None, :] < kv_len
            if IS_CAUSAL:
                seen = seen & (k_pos[None, :] <= q_pos[:, None])
            s = tl.where(seen, s, float("-inf"))
            if KEY_BLOCKS == 1:
                tl.store(out + block, _lse(s, 1), mask=row_store)
            else:  # the CPU interpreter: every key block of the row tile in one step (its cost is per program)
                blocks = block + tl.arange(0, KEY_BLOCKS)
                lse = _lse(tl.reshape(s, (BLOCK_M, KEY_BLOCKS, BLOCK_N)), 2)
                tl.store(out[:, None] + blocks[None, :], lse, mask=row_ok[:, None] & (blocks[None, :] < nk))
        elif KEY_BLOCKS == 1:
            tl.store(out + block, tl.full((BLOCK_M,), float("-inf"), tl.float32), mask=row_store)
        else:
            blocks = block + tl.arange(0, KEY_BLOCKS)
            tl.store(out[:, None] + blocks[None, :], tl.full((BLOCK_M, KEY_BLOCKS), float("-inf"), tl.float32),
                     mask=row_ok[:, None] & (blocks[None, :] < nk))


@triton.jit
def _lse(s, AXIS: tl.constexpr):
    """Natural log-sum-exp of base-2 scores ``s`` along ``AXIS`` (``-inf`` where every score is)."""
    peak = tl.max(s, axis=AXIS)
    safe = tl.where(peak == float("-inf"), 0.0, peak)
    total = tl.sum(tl.exp2(s - tl.expand_dims(safe, AXIS)), axis=AXIS)
    total = tl.where(peak == float("-inf"), 1.0, total)  # a row that sees no key of the block: -inf below
    return tl.where(peak == float("-inf"), float("-inf"), (safe + tl.log2(total)) * LN2)


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


def sampled_rows_block_lse(query: Tensor, key: Tensor, block_size: int, per_block: int, is_causal: bool,
                           scale: float, block_map: Tensor | None = None) -> Tensor:
    """float32 ``[B, KVH, G * Mq * per_block, Nk]``: see :func:`sampled_rows_block_lse_reference` (the same
    values), through the ``dam::sampled_rows_block_lse`` kernel op where it runs."""
    if kernel_runs(query, block_size):
        return sampled_rows_block_lse_op(query, key, block_size, per_block, is_causal, scale, block_map)
    return sampled_rows_block_lse_reference(query, key, block_size, per_block, is_causal, scale, block_map)


# Ops, so that compiled callers (the dynamic plan, compiled with dynamic shapes) treat a launch as one opaque
# call with concrete sizes, and exporters can decompose it into the reference.
@lean_op("dam::last_rows_block_lse")
def last_rows_block_lse_op(query: Tensor, key: Tensor, block_size: int, is_causal: bool, scale: float) -> Tensor:
    """The Triton kernel; ``query [B, H, Lq, E]``, ``key [B, KVH, Lk, E]`` -> float32 ``[B, KVH, G * R, Nk]``."""
    return launch_last_rows_block_lse(query, key, block_size, is_causal, scale)


@lean_op("dam::sampled_rows_block_lse")
def sampled_rows_block_lse_op(query: Tensor, key: Tensor, block_size: int, per_block: int, is_causal: bool,
                              scale: float, block_map: Optional[Tensor] = None) -> Tensor:
    """The Triton kernel; ``query [B, H, Lq, E]``, ``key [B, KVH, Lk, E]`` -> float32
    ``[B, KVH, G * Mq * per_block, Nk]``; ``block_map``: int32 ``[Mq]`` (see the reference)."""
    return _launch(query, key, block_size, is_causal, scale, _sampled_rows(query.shape[-2], block_size, per_block),
                   per_block, block_map)


def launch_last_rows_block_lse(query: Tensor, key: Tensor, block_size: int, is_causal: bool,
                               scale: float) -> Tensor:
    """The kernel's launch for the last rows, for callers already inside an op (no second dispatch: host time
    counts)."""
    return _launch(query, key, block_size, is_causal, scale, exact_query_rows(query.shape[-2], block_size), 0)


def launch_sampled_rows_block_lse(query: Tensor, key: Tensor, block_size: int, per_block: int, is_causal: bool,
                                  scale: float) -> Tensor:
    """The kernel's launch for ``per_block`` rows of every query block, for callers already inside an op."""
    return _launch(query, key, block_size, is_causal, scale, _sampled_rows(query.shape[-2], block_size, per_block),
                   per_block)


def _sampled_rows(q_len: int, block_size: int, per_block: int) -> int:
    if per_block < 1 or block_size % per_block:
        raise ValueError(f"per_block must divide block_size={block_size}, got {per_block}")
    return cdiv(q_len, block_size) * per_block


def key_blocks_per_program(nk: int, rows_per_program: int, block_size: int) -> int:
    """Key blocks one program reduces in one step: one on a GPU (its steps walk key blocks one by one,
    :func:`loop_blocks_per_program`); on the CPU interpreter as many as a Triton tensor holds (a score tile of at
    most 2**20 elements), up to every one."""
    if not interpreting():
        return 1
    fits = max(1, TRITON_MAX_TENSOR_NUMEL // (rows_per_program * block_size))
    return min(next_power_of_2(nk), 1 << (fits.bit_length() - 1))


# On a GPU a program walks up to this many key blocks with its row tile's queries loaded once (one key block a
# program reloaded them for each: 8M programs at 128K), as long as the grid keeps MIN_PROGRAMS programs.
MAX_LOOP_BLOCKS = 16
MIN_PROGRAMS = 2048


def loop_blocks_per_program(nk: int, row_tiles: int) -> int:
    """Key blocks one GPU program walks (a power of two, 1 under the interpreter): the most, up to
    ``MAX_LOOP_BLOCKS``, that leave at least ``MIN_PROGRAMS`` programs (``row_tiles``: over batch and KV heads)."""
    if interpreting():
        return 1
    loop = MAX_LOOP_BLOCKS
    while loop > 1 and cdiv(nk, loop) * row_tiles < MIN_PROGRAMS:
        loop //= 2
    return loop


class LseLaunch(NamedTuple):
    """One launch of the row-LSE kernel: its grid, arguments, constants and the output it writes; ``kernel``,
    the Triton kernel itself (``benchmarks/kernel_resources.py`` compiles it from the launch)."""

    grid: tuple[int, int, int]
    args: tuple
    constants: dict
    out: Tensor
    kernel: Any = _rows_block_lse_kernel


def lse_launch(query: Tensor, key: Tensor, block_size: int, is_causal: bool, scale: float, rows: int,
               per_block: int, block_map: Tensor | None = None) -> LseLaunch:
    """The launch of ``rows`` query rows per head: the last ones (``per_block == 0``) or ``per_block`` of every
    query block (``block_map``: their places, a shard's). ``benchmarks/kernel_resources.py`` compiles it too."""
    query = query if query.stride(-1) == 1 else query.contiguous()
    key = key if key.stride(-1) == 1 else key.contiguous()
    batch, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[-2]
    group = heads // kv_heads
    nk = cdiv(kv_len, block_size)
    out = torch.empty((batch, kv_heads, group * rows, nk), device=query.device, dtype=torch.float32)
    per_program = INTERPRETER_ROWS_PER_PROGRAM if interpreting() else ROWS_PER_PROGRAM
    key_blocks = key_blocks_per_program(nk, per_program, block_size)
    row_tiles = cdiv(group * rows, per_program)
    loop = loop_blocks_per_program(nk, row_tiles * batch * kv_heads)
    grid = (cdiv(nk, key_blocks * loop), row_tiles, batch * kv_heads)
    block_map = None if block_map is None else block_map.to(device=query.device, dtype=torch.int32)
    args = (query, key, out, out if block_map is None else block_map,
            query.stride(0), query.stride(1), query.stride(2),
            key.stride(0), key.stride(1), key.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            q_len, kv_len, rows, group, kv_heads, scale * LOG2E.value, max(per_block, 1), nk)
    constants = dict(IS_CAUSAL=is_causal, SAMPLED=per_block > 0, HAS_MAP=block_map is not None, BLOCK_N=block_size,
                     BLOCK_M=per_program, KEY_BLOCKS=key_blocks, LOOP_BLOCKS=loop, HEAD_DIM=dim,
                     DIM_PAD=max(16, next_power_of_2(dim)),
                     **dot_options(query.dtype), num_warps=4, num_stages=2)
    return LseLaunch(grid, args, constants, out)


def _launch(query: Tensor, key: Tensor, block_size: int, is_causal: bool, scale: float, rows: int,
            per_block: int, block_map: Tensor | None = None) -> Tensor:
    launch = lse_launch(query, key, block_size, is_causal, scale, rows, per_block, block_map)
    launch.kernel[launch.grid](*launch.args, **launch.constants)
    return launch.out


def _fake_lse(query: Tensor, key: Tensor, block_size: int, rows: int) -> Tensor:
    batch, heads = query.shape[:2]
    kv_heads, kv_len = key.shape[1], key.shape[-2]
    return query.new_empty((batch, kv_heads, heads // kv_heads * rows, cdiv(kv_len, block_size)),
                           dtype=torch.float32)


@last_rows_block_lse_op.register_fake
def _(query, key, block_size, is_causal, scale):
    return _fake_lse(query, key, block_size, exact_query_rows(query.shape[-2], block_size))


@sampled_rows_block_lse_op.register_fake
def _(query, key, block_size, per_block, is_causal, scale, block_map=None):
    return _fake_lse(query, key, block_size, _sampled_rows(query.shape[-2], block_size, per_block))
