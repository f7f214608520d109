"""What the decode tests share (``kernels/test_decode_kernel.py``, ``dynamic/test_decode_plan.py``): one query row
against a KV cache, and the token mask of a decode plan's block lists."""

from __future__ import annotations

import torch

from dam_compile.plan.block_plan import BlockSparsePlan


def qkv(b, h, kvh, kv_len, d, dtype=torch.float32, device="cpu"):
    """Random ``q [b, h, 1, d]`` (one decode row), ``k, v [b, kvh, kv_len, d]``, seeded by the shape."""
    g = torch.Generator(device="cpu").manual_seed(kv_len * 7 + h)
    make = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return make(b, h, 1, d), make(b, kvh, kv_len, d), make(b, kvh, kv_len, d)


def token_allowed(counts, indices, block, kv_len):
    """[B, H, 1, Lk] bool: keys inside the listed blocks."""
    plan = BlockSparsePlan(counts, indices, block)
    partial, _ = plan.block_tables(kv_len)
    return partial.repeat_interleave(block, dim=-1)[..., :kv_len]
