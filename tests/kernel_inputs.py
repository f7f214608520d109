"""Inputs, plans and the float64 oracle that the kernel tests share (``kernels/test_block_sparse_launch.py``,
``kernels/test_hopper_launch.py``, ``ops/test_attention.py``, ``plan/test_reference.py``).

On the CPU the kernels run in Triton's interpreter (``conftest.py``); ``DEVICE`` is where the tensors live.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from dam_compile.kernels.block_sparse_launch import triton_block_sparse_attention
from dam_compile.plan.block_plan import PATTERN_PAD, BlockSparsePlan
from dam_compile.plan.reference import token_mask
from dam_compile.plan.structured_plans import dense_plan, streaming_plan

from dam_testing import dense_oracle, rel_err, tolerance

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # bench_plans: the random plans
from bench_plans import random_plan  # noqa: E402

BLOCK = 16
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def inputs(b=1, h=4, kvh=2, q_len=72, kv_len=None, d=64, dtype=torch.bfloat16, device=DEVICE):
    """Random ``q [b, h, q_len, d]``, ``k, v [b, kvh, kv_len, d]``."""
    kv_len = q_len if kv_len is None else kv_len
    q = torch.randn(b, h, q_len, d, dtype=dtype, device=device)
    k = torch.randn(b, kvh, kv_len, d, dtype=dtype, device=device)
    v = torch.randn(b, kvh, kv_len, d, dtype=dtype, device=device)
    return q, k, v


def launch(q, k, v, plan, **kwargs):
    """The kernel on a NaN-poisoned output buffer (an unwritten element fails ``rel_err``)."""
    out = torch.full((*q.shape[:-1], v.shape[-1]), float("nan"), dtype=q.dtype, device=q.device)
    result = triton_block_sparse_attention(q, k, v, plan, enable_gqa=True, out=out, **kwargs)
    assert (result[0] if isinstance(result, tuple) else result) is out
    return result


def oracle(q, k, v, plan, *, is_causal, attn_mask=None, scale=None, q_offset=0, kv_range=None):
    """float64 dense attention over the plan's token mask, on the CPU."""
    allowed = token_mask(plan, q.shape[-2], k.shape[-2], is_causal, q_offset=q_offset, kv_range=kv_range)
    return dense_oracle(q.cpu(), k.cpu(), v.cpu(), allowed.cpu(), None if attn_mask is None else attn_mask.cpu(), scale)


def make_plan(kind, q_len, kv_len, heads, causal, device=DEVICE, q_offset=0):
    """``"dense"``, ``"diagonal"`` (the local block only), ``"sink"`` (the first block only), or a density
    (``"0.5"``): a random plan keeping that share of the visible blocks."""
    g = torch.Generator(device=device).manual_seed(1)
    if kind == "dense":
        return dense_plan(q_len, kv_len, BLOCK, causal, device, q_offset=q_offset)
    if kind == "diagonal":
        assert q_offset == 0
        return streaming_plan(q_len, kv_len, BLOCK, causal, 0, 1, device)
    if kind == "sink":
        assert q_offset == 0
        return streaming_plan(q_len, kv_len, BLOCK, causal, 1, 0, device)
    return random_plan(q_len, kv_len, BLOCK, float(kind), heads, causal, device, g, q_offset=q_offset)


def check(out, expected, dtype):
    assert rel_err(out.cpu(), expected) < tolerance(dtype)


def listed_pattern_plan(heads, q_len, kv_len, device=DEVICE):
    """Every visible block partial, with per-head token diagonals ``{0, 1 + h, 17 + 3h}`` and columns
    ``{0, 5 + h}`` (the first head broadcast-free)."""
    table = dense_plan(q_len, kv_len, BLOCK, True, device).block_tables(kv_len)
    kept = (table[0] | table[1]).expand(1, heads, -1, -1).contiguous()
    diagonals = torch.full((heads, 4), PATTERN_PAD, dtype=torch.int32)
    columns = torch.full((heads, 3), PATTERN_PAD, dtype=torch.int32)
    for h in range(heads):
        offsets = sorted({0, 1 + h, 17 + 3 * h})
        diagonals[h, : len(offsets)] = torch.tensor(offsets)
        cols = sorted({0, 5 + h})
        columns[h, : len(cols)] = torch.tensor(cols)
    plan = BlockSparsePlan.from_block_tables(kept, BLOCK)
    return BlockSparsePlan(plan.kv_num_blocks, plan.kv_indices, BLOCK,
                           token_diagonals=diagonals.to(device), token_columns=columns.to(device))
