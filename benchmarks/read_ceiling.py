"""The decode part's ceiling: a kernel that only reads the kept K/V blocks, on the decode kernel's grid.

Each program takes one KV head's blocks at list positions ``split, split + splits, ...`` (the decode kernel's
split by rank, ``decode_splits`` programs per KV head), reads them in the decode kernel's steps (``TILE_KEYS``
keys, ``STAGES`` in flight, four warps) and sums ``K * V`` so that nothing is optimised away. No lists to
decode, no scores, no merge: the time a decode step over those blocks could take with this launch shape, which
the decode rows report beside ours.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from dam_compile.kernels import decode_kernel  # the steps this reads in: its TILE_KEYS and STAGES
from dam_compile.kernels.decode_kernel import decode_splits
from dam_compile.kernels.common import interpreting


@triton.jit
def _read_kept_blocks(K, V, Table, Counts, Out, stride_kh, stride_kn, splits,
                      RANGE: tl.constexpr, PLAN_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                      STAGES: tl.constexpr):
    """Program ``(kvh, split)``: ``Out[kvh * splits + split]`` = sum of ``K * V`` over the keys of blocks
    ``Table[kvh, split, :Counts[kvh, split]]`` (``K``/``V`` ``[KVH, Lk, HEAD_DIM]``, last stride 1)."""
    kvh = tl.program_id(0)
    item = kvh * splits + tl.program_id(1)
    offs_j = tl.arange(0, RANGE)
    blocks = tl.load(Table + item * RANGE + offs_j)
    offs_d = tl.arange(0, HEAD_DIM)
    SUB: tl.constexpr = PLAN_BLOCK // BLOCK_N
    acc = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for step in tl.range(0, tl.load(Counts + item) * SUB, num_stages=STAGES):
        block = tl.sum(tl.where(offs_j == step // SUB, blocks, 0), axis=0)
        offs_n = block.to(tl.int64) * PLAN_BLOCK + (step % SUB) * BLOCK_N + tl.arange(0, BLOCK_N)
        offsets = kvh.to(tl.int64) * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :]
        acc += tl.load(K + offsets).to(tl.float32) * tl.load(V + offsets).to(tl.float32)
    tl.store(Out + item, tl.sum(tl.sum(acc, axis=1), axis=0))


class KeptBlockReader:
    """Reads the kept blocks ``lists`` (int32 ``[KVH, keep]``, ascending, each KV head's) of ``key``/``value``
    (``[1, KVH, Lk, E]``, contiguous, whole blocks of ``block_size`` keys) on the decode kernel's grid; the
    programs' tables are made once, so a call is one launch."""

    def __init__(self, key: Tensor, value: Tensor, lists: Tensor, block_size: int):
        kv_heads, kv_len, head_dim = key.shape[1:]
        if key.shape[0] != 1 or not key.is_contiguous() or value.stride() != key.stride() or kv_len % block_size:
            raise ValueError("key and value must be contiguous [1, KVH, Lk, E] with whole blocks")
        self.splits = decode_splits(kv_heads, kv_len // block_size, key.device)
        per_split = -(-lists.shape[1] // self.splits)
        self.range = triton.next_power_of_2(per_split)
        self.table = torch.zeros(kv_heads, self.splits, self.range, dtype=torch.int32, device=key.device)
        self.counts = torch.zeros(kv_heads, self.splits, dtype=torch.int32, device=key.device)
        for split in range(self.splits):
            mine = lists[:, split::self.splits]
            self.table[:, split, :mine.shape[1]] = mine
            self.counts[:, split] = mine.shape[1]
        self.out = torch.empty(kv_heads * self.splits, dtype=torch.float32, device=key.device)
        self.key, self.value, self.block_size = key, value, block_size

    def __call__(self) -> Tensor:
        """``[KVH * splits]`` float32: each program's sum of ``K * V`` over its blocks."""
        _read_kept_blocks[(self.key.shape[1], self.splits)](
            self.key, self.value, self.table, self.counts, self.out, self.key.stride(1), self.key.stride(2),
            self.splits, RANGE=self.range, PLAN_BLOCK=self.block_size,
            BLOCK_N=min(self.block_size, decode_kernel.TILE_KEYS), HEAD_DIM=self.key.shape[-1],
            STAGES=1 if interpreting() else decode_kernel.STAGES, num_warps=1 if interpreting() else 4)
        return self.out
