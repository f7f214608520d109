"""Shared helpers of the test suite."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# Options that make the rewritten graph run the sparse reference on a CPU at small sizes.
# dense_layers=0: every layer takes the sparse path these tests check (tests/test_dense_layers.py: the default).
CPU_SPARSE = {"mask_source": "dense", "kernel": "reference", "min_seq_len": 0, "block_size": 16, "inner_backend": "aot_eager",
              "dense_layers": 0}


def rel_err(actual: Tensor, expected: Tensor) -> float:
    assert not torch.isnan(actual).any(), "output has NaN"
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


def tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}[dtype]


def dense_oracle(q, k, v, allowed: Tensor, attn_mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    """float64 attention with a token mask ``allowed`` (broadcastable to [B, H, Lq, Lk]); rows with no allowed
    key give zeros. Written independently of the reference: repeat K/V heads, full score matrix."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            scores = scores + attn_mask.double()
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return weights @ v


def capture_graph(fn, *args, **kwargs):
    """The Dynamo FX graph module(s) ``fn(*args)`` compiles to (no backend work)."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=capture)(*args, **kwargs)
    return graphs


def sdpa(q, k, v, **kwargs):
    return F.scaled_dot_product_attention(q, k, v, **kwargs)
