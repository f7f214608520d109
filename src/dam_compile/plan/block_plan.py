"""The block-sparse plan: which key blocks each query block attends to.

One format, shared by the mask generators (producers), the PyTorch reference and the Triton kernel (consumers)
and the benchmarks. It has FlexAttention ``BlockMask`` semantics, so the same tensors can be handed to
``BlockMask.from_kv_blocks``:

- ``kv_num_blocks[b, h, m]`` / ``kv_indices[b, h, m, :]``: the *partial* key blocks of query block ``m``,
  those that need the in-block mask (the causal diagonal, token-exact patterns). Only the first
  ``kv_num_blocks`` indices count; they are sorted ascending and unique.
- ``full_kv_num_blocks`` / ``full_kv_indices`` (optional): key blocks every query of the block sees entirely,
  which need no in-block masking. Without them every kept block is treated as partial.

- ``token_diagonals`` / ``token_columns`` (optional, the token-exact DAM mode): per query head, int32
  ``[Hp, R]`` / ``[Hp, C]``, sorted ascending, unused slots at the end set to :data:`PATTERN_PAD`. Inside a
  *partial* block, query ``i`` then sees key ``j`` only if ``i - j`` is one of the head's diagonal offsets or
  ``j`` one of its columns (on top of the causal test). Full blocks are still seen entirely, so a generator
  lists a block as full when the pattern covers it: only blocks the pattern cuts pay the per-token test.
- ``token_corner`` (optional, with the pattern): bool or int8 ``[Hp, P, P]``, DAM's true mask at the pattern
  capture length. Inside partial blocks a pair with query position ``< P`` and key ``< P`` is decided by it
  instead of by the diagonals and columns.

A key block is kept when it is in either list; the two lists are disjoint. The leading dims are the batch
(``1`` to broadcast) and the query head (``1`` to broadcast). Query block ``m`` covers query rows
``[m * block_size, (m + 1) * block_size)`` and key block ``n`` covers key positions likewise; the last blocks
may be ragged. Query row ``i`` sits at key position ``i + q_offset`` (an argument of the consumers): ``0`` is
``scaled_dot_product_attention``'s top-left alignment, ``kv_len - q_len`` aligns the queries to the end of the
keys (a suffix of queries, as with a KV cache). Causal masking lets query ``i`` see key ``j <= i + q_offset``;
diagonal offsets count from the same position.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from .arith import cdiv


class PlanError(ValueError):
    """A block-sparse plan that does not fit its inputs or breaks the format's rules."""


PATTERN_PAD = -(2**31)  # fills the unused slots of token_diagonals / token_columns


def num_blocks(length: int, block_size: int) -> int:
    """Number of blocks of ``block_size`` covering ``length`` positions (the last one may be ragged)."""
    return cdiv(length, block_size)


@dataclass(frozen=True)
class BlockSparsePlan:
    """Per (batch-or-broadcast, head-or-broadcast, query block) lists of kept key blocks.

    Shapes: ``kv_num_blocks`` int32 ``[Bp, Hp, Mq]``; ``kv_indices`` int32 ``[Bp, Hp, Mq, K]`` with any
    ``K >= 0``; the optional ``full_*`` pair has the same layout. ``Bp`` is 1 or the batch, ``Hp`` is 1 or the
    number of query heads, ``Mq = ceil(q_len / block_size)``. ``token_diagonals`` ``[Hp, R]`` and
    ``token_columns`` ``[Hp, C]`` (int32, sorted, padded with :data:`PATTERN_PAD`) come together or not at all.
    """

    kv_num_blocks: Tensor
    kv_indices: Tensor
    block_size: int
    full_kv_num_blocks: Tensor | None = None
    full_kv_indices: Tensor | None = None
    token_diagonals: Tensor | None = None
    token_columns: Tensor | None = None
    token_corner: Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise PlanError(f"block_size must be a positive int, got {self.block_size!r}")
        if (self.full_kv_num_blocks is None) != (self.full_kv_indices is None):
            raise PlanError("full_kv_num_blocks and full_kv_indices must be given together")
        if (self.token_diagonals is None) != (self.token_columns is None):
            raise PlanError("token_diagonals and token_columns must be given together")
        if self.token_corner is not None and self.token_diagonals is None:
            raise PlanError("token_corner needs token_diagonals and token_columns")

    @property
    def has_full_blocks(self) -> bool:
        return self.full_kv_num_blocks is not None

    @property
    def has_token_pattern(self) -> bool:
        return self.token_diagonals is not None

    def validate(
        self, *, batch: int, heads: int, q_len: int, kv_len: int, check_values: bool = True
    ) -> None:
        """Raise :class:`PlanError` unless the plan fits a ``[batch, heads, q_len, *]`` query against
        ``kv_len`` keys. ``check_values`` also checks counts, index range, order and disjointness (this reads
        the tensors, so on CUDA it synchronises)."""
        mq, nk = num_blocks(q_len, self.block_size), num_blocks(kv_len, self.block_size)
        pairs = [("kv", self.kv_num_blocks, self.kv_indices)]
        if self.has_full_blocks:
            pairs.append(("full_kv", self.full_kv_num_blocks, self.full_kv_indices))
        for name, counts, indices in pairs:
            _check_layout(name, counts, indices, batch=batch, heads=heads, mq=mq)
            if check_values:
                _check_values(name, counts, indices, nk)
        if check_values and self.has_full_blocks:
            partial, full = self.block_tables(kv_len)
            if bool((partial & full).any()):
                raise PlanError("a key block is listed both in kv_indices and in full_kv_indices")
        if self.has_token_pattern:
            for name, t in (("token_diagonals", self.token_diagonals), ("token_columns", self.token_columns)):
                _check_pattern(name, t, heads, self.kv_num_blocks.device, check_values)
            if self.token_corner is not None:
                _check_corner(self.token_corner, heads, self.kv_num_blocks.device)

    def block_tables(self, kv_len: int) -> tuple[Tensor, Tensor]:
        """Boolean ``(partial, full)`` tables, each ``[Bp, Hp, Mq, Nk]`` with ``Nk = ceil(kv_len / block_size)``."""
        nk = num_blocks(kv_len, self.block_size)
        partial = _table_from_lists(self.kv_num_blocks, self.kv_indices, nk)
        if self.has_full_blocks:
            full = _table_from_lists(self.full_kv_num_blocks, self.full_kv_indices, nk)
        else:
            full = torch.zeros_like(partial)
        return partial, full

    def kept_blocks(self) -> Tensor:
        """Number of kept key blocks (partial + full) per ``[Bp, Hp, Mq]``."""
        kept = self.kv_num_blocks.to(torch.int64)
        if self.has_full_blocks:
            kept = kept + self.full_kv_num_blocks.to(torch.int64)
        return kept

    def as_op_args(self) -> tuple[Tensor | None, ...]:
        """The seven plan tensors in the order ``torch.ops.dam.sparse_attention`` takes them."""
        return (
            self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks, self.full_kv_indices,
            self.token_diagonals, self.token_columns, self.token_corner,
        )

    @classmethod
    def from_block_tables(
        cls, partial: Tensor, block_size: int, full: Tensor | None = None, *, compact: bool = False
    ) -> "BlockSparsePlan":
        """Build a plan from boolean tables ``[Bp, Hp, Mq, Nk]`` (``True`` = kept). Indices come out sorted.
        ``compact`` trims the index lists to the longest row (reads the counts: a device sync), which is what
        makes a cached sparse plan small; otherwise they are ``Nk`` wide."""
        if partial.dtype != torch.bool or partial.dim() != 4:
            raise PlanError(f"partial must be a 4-D bool table, got {partial.dtype} {tuple(partial.shape)}")
        counts, indices = lists_from_table(partial, compact)
        if full is None:
            return cls(counts, indices, block_size)
        if full.shape != partial.shape or full.dtype != torch.bool:
            raise PlanError(f"full must be a bool table shaped like partial {tuple(partial.shape)}")
        full_counts, full_indices = lists_from_table(full, compact)
        return cls(counts, indices, block_size, full_counts, full_indices)

    def with_token_pattern(self, diagonals: Tensor, columns: Tensor, corner: Tensor | None = None) -> "BlockSparsePlan":
        """This plan with a token-exact pattern attached (see the module docstring)."""
        return dataclasses.replace(self, token_diagonals=diagonals, token_columns=columns, token_corner=corner)


def lists_from_table(table: Tensor, compact: bool = False) -> tuple[Tensor, Tensor]:
    """Counts ``[..., Mq]`` and ascending index lists ``[..., Mq, Nk]`` (int32) of a bool table ``[..., Mq, Nk]``."""
    counts = table.sum(-1, dtype=torch.int32)
    # Kept block j goes to slot (number of kept blocks before it): kept indices first, in ascending order.
    # Dropped blocks land in a spare last slot; slots past the count stay 0 (a valid block id, never read).
    # No sort: cheaper, and exporters (torch-mlir) lack a stable sort.
    nk = table.shape[-1]
    slot = torch.where(table, table.cumsum(-1, dtype=torch.int64) - 1, nk)
    blocks = torch.arange(nk, device=table.device, dtype=torch.int32).expand(table.shape)
    spare = torch.zeros((*table.shape[:-1], nk + 1), dtype=torch.int32, device=table.device)
    indices = spare.scatter(-1, slot, blocks)[..., :nk].contiguous()
    if compact:
        width = int(counts.max().item()) if counts.numel() else 0
        indices = indices[..., :width].contiguous()
    return counts, indices


def _table_from_lists(counts: Tensor, indices: Tensor, nk: int) -> Tensor:
    width = indices.shape[-1]
    listed = torch.arange(width, device=indices.device) < counts.unsqueeze(-1)
    # Unlisted slots scatter into a spare column nk, dropped afterwards.
    target = torch.where(listed, indices.to(torch.int64), nk).clamp(0, nk)
    table = torch.zeros((*indices.shape[:-1], nk + 1), dtype=torch.bool, device=indices.device)
    return table.scatter(-1, target, True)[..., :nk]  # out of place: traceable into functional graphs


def _check_layout(name: str, counts: Tensor, indices: Tensor, *, batch: int, heads: int, mq: int) -> None:
    for label, t in ((f"{name}_num_blocks", counts), (f"{name}_indices", indices)):
        if not isinstance(t, Tensor):
            raise PlanError(f"{label} must be a tensor, got {type(t).__name__}")
        if t.dtype != torch.int32:
            raise PlanError(f"{label} must be int32, got {t.dtype}")
    if counts.dim() != 3 or indices.dim() != 4:
        raise PlanError(
            f"{name}_num_blocks must be [B, H, Mq] and {name}_indices [B, H, Mq, K]; got "
            f"{tuple(counts.shape)} and {tuple(indices.shape)}"
        )
    if tuple(indices.shape[:3]) != tuple(counts.shape):
        raise PlanError(
            f"{name}_indices leading dims {tuple(indices.shape[:3])} differ from {name}_num_blocks "
            f"{tuple(counts.shape)}"
        )
    b, h, m = counts.shape
    if b not in (1, batch) or h not in (1, heads) or m != mq:
        raise PlanError(
            f"{name}_num_blocks is {tuple(counts.shape)}; expected [1 or {batch}, 1 or {heads}, {mq}] "
            f"for batch={batch}, query heads={heads} and {mq} query blocks"
        )
    if counts.device != indices.device:
        raise PlanError(f"{name}_num_blocks and {name}_indices are on different devices")


def _check_pattern(name: str, t: Tensor, heads: int, device: torch.device, check_values: bool) -> None:
    if not isinstance(t, Tensor) or t.dtype != torch.int32 or t.dim() != 2:
        raise PlanError(f"{name} must be an int32 [Hp, R] tensor, got {getattr(t, 'dtype', type(t).__name__)} "
                        f"{tuple(getattr(t, 'shape', ()))}")
    if t.shape[0] not in (1, heads):
        raise PlanError(f"{name} has {t.shape[0]} heads; expected 1 or {heads}")
    if t.device != device:
        raise PlanError(f"{name} is on {t.device}, the block lists on {device}")
    if check_values and t.shape[1] > 1:
        used = t != PATTERN_PAD
        if bool((used[:, 1:] & ~used[:, :-1]).any()):
            raise PlanError(f"{name}: padding ({PATTERN_PAD}) must come after every used slot")
        if bool((used[:, 1:] & (t[:, 1:] <= t[:, :-1])).any()):
            raise PlanError(f"{name} must be strictly increasing within each head")


def _check_corner(corner: Tensor, heads: int, device: torch.device) -> None:
    if not isinstance(corner, Tensor) or corner.dtype not in (torch.bool, torch.int8) or corner.dim() != 3:
        raise PlanError(f"token_corner must be a bool or int8 [Hp, P, P] tensor, got "
                        f"{getattr(corner, 'dtype', type(corner).__name__)} {tuple(getattr(corner, 'shape', ()))}")
    if corner.shape[0] not in (1, heads) or corner.shape[1] != corner.shape[2]:
        raise PlanError(f"token_corner is {tuple(corner.shape)}; expected [1 or {heads}, P, P]")
    if corner.device != device:
        raise PlanError(f"token_corner is on {corner.device}, the block lists on {device}")


def _check_values(name: str, counts: Tensor, indices: Tensor, nk: int) -> None:
    width = indices.shape[-1]
    if bool(((counts < 0) | (counts > min(width, nk))).any()):
        raise PlanError(f"{name}_num_blocks must lie in [0, min(K={width}, Nk={nk})]")
    listed = torch.arange(width, device=indices.device) < counts.unsqueeze(-1)
    if bool((listed & ((indices < 0) | (indices >= nk))).any()):
        raise PlanError(f"{name}_indices out of range: listed key blocks must lie in [0, {nk})")
    if width > 1:
        both_listed = listed[..., 1:]
        if bool((both_listed & (indices[..., 1:] <= indices[..., :-1])).any()):
            raise PlanError(f"{name}_indices must be strictly increasing within each listed row")
