"""A key padding vector read once per forward: ``dam::key_padding``.

Under ``torch.compile`` HuggingFace cannot skip an all-ones ``attention_mask``: it builds a ``[B, 1, N, N]``
causal-and-padding mask, which keeps SDPA off its causal kernels and our kernel off its fastest path. The pass
reads such a mask as ``is_causal=True`` and its last row (the key padding vector, ``[B, 1, 1, N]``); this op
then describes that vector the cheapest way that is still exact, for every attention call of the forward:

- ``ALL_VALID``: every key of every sequence is valid: plain causal attention, no mask, no range;
- ``RANGES``: each sequence's valid keys are one run ``[start, end)`` (left or right padding, what batched
  ``generate()`` makes): ``kv_range`` says where, and the kernels skip the rest without reading a mask;
- ``HOLES``: some sequence has an invalid key between valid ones: only the vector itself says which.

Telling them apart needs the vector's values on the host: one synchronisation per forward (eager HuggingFace
makes the same one to skip its mask), never one per layer. The kind comes back as a CPU tensor, so each
attention call reads it for free. While a CUDA graph is being captured nothing may synchronise: the kind is then
``HOLES``, whose path is exact for every vector.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dam_compile.kernels.lean_op import lean_op

ALL_VALID, RANGES, HOLES = 0, 1, 2
PADDING_KINDS = {ALL_VALID: "every key valid", RANGES: "one run of valid keys per sequence",
                 HOLES: "invalid keys between valid ones"}


def key_ranges(valid: Tensor) -> tuple[Tensor, Tensor]:
    """``(kv_range [B, 2] int32, contiguous [B] bool)`` of a bool ``[B, N]`` vector: each row's first valid key
    and one past its last (``[0, 0)`` for a row with none), and whether every key between them is valid."""
    n = valid.shape[-1]
    positions = torch.arange(n, device=valid.device)
    start = torch.where(valid, positions, n).amin(-1)
    end = torch.where(valid, positions + 1, 0).amax(-1)
    empty = end <= start
    start, end = start.masked_fill(empty, 0), end.masked_fill(empty, 0)
    contiguous = valid.sum(-1) == end - start
    return torch.stack([start, end], dim=-1).to(torch.int32), contiguous


def kind_of(valid: Tensor, contiguous: Tensor) -> int:
    """The :data:`PADDING_KINDS` entry of a bool ``[B, N]`` vector (host values: one synchronisation)."""
    every, runs = torch.stack([valid.all(), contiguous.all()]).tolist()
    return ALL_VALID if every else RANGES if runs else HOLES


@lean_op("dam::key_padding")
def key_padding_op(row: Tensor) -> tuple[Tensor, Tensor]:
    """The key padding vector ``row`` (bool, ``[B, 1, 1, N]``: the last row of a causal-and-padding mask) as
    ``(kv_range [B, 2] int32 on row's device, kind [1] int64 on the CPU)``; see the module docstring."""
    valid = row.reshape(row.shape[0], row.shape[-1])
    kv_range, contiguous = key_ranges(valid)
    capturing = row.is_cuda and torch.cuda.is_current_stream_capturing()
    kind = HOLES if capturing else kind_of(valid, contiguous)
    return kv_range, torch.tensor([kind], dtype=torch.int64)


@key_padding_op.register_fake
def _(row: Tensor) -> tuple[Tensor, Tensor]:
    return row.new_empty((row.shape[0], 2), dtype=torch.int32), torch.empty(1, dtype=torch.int64, device="cpu")


def key_padding_unknown(row: Tensor) -> tuple[Tensor, Tensor]:
    """``dam::key_padding`` without the host read, for exporters (a graph that cannot synchronise): the kind is
    ``HOLES``, so the attention reads the vector itself (exact for any vector)."""
    valid = row.reshape(row.shape[0], row.shape[-1])
    return key_ranges(valid)[0], torch.full((1,), HOLES, dtype=torch.int64)  # a factory: traces functionally


def range_mask(kv_range: Tensor, kv_len: int) -> Tensor:
    """bool ``[B, 1, 1, kv_len]``: ``True`` at the keys inside each sequence's ``[start, end)``."""
    keys = torch.arange(kv_len, device=kv_range.device)
    inside = (keys >= kv_range[:, :1]) & (keys < kv_range[:, 1:])
    return inside[:, None, None, :]


def padding_inputs(kind: int, row: Tensor | None, kv_range: Tensor | None, batch: int
                   ) -> tuple[Tensor | None, Tensor | None]:
    """``(attn_mask, kv_range)`` for an attention call of ``batch`` sequences whose key padding ``dam::key_padding``
    described as ``kind``, ``row`` and ``kv_range``: the cheaper exact one of the two descriptions."""
    if kind == ALL_VALID:
        return None, None
    if kind == RANGES:
        if kv_range is None:
            raise ValueError("padding_kind says the keys are runs, but no kv_range was given")
        return None, kv_range if kv_range.shape[0] == batch else kv_range.expand(batch, 2).contiguous()
    if kind == HOLES:
        if row is None:
            raise ValueError("padding_kind says the keys have holes, but no attn_mask was given")
        return row, None
    raise ValueError(f"padding_kind must be one of {sorted(PADDING_KINDS)}, got {kind}")
