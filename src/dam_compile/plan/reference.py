"""Plain-PyTorch block-sparse attention: the CPU path and the oracle for the Triton kernel.

It computes exactly what ``torch.ops.dam.sparse_attention`` computes on its sparse path: softmax attention
restricted to the plan's kept key blocks, with in-block causal masking and the token-exact pattern on partial
blocks only, per-sequence valid key ranges, any ``attn_mask`` of ``scaled_dot_product_attention``, GQA and a
custom scale. Query rows are processed in chunks
so no tensor grows with ``q_len * kv_len``: memory stays ``O(max_chunk_elements + inputs)``.

A query row that keeps no key at all returns zeros (as ``scaled_dot_product_attention``'s math path does for
fully masked rows), never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from .arith import softmax_scale
from .block_plan import BlockSparsePlan, num_blocks
from .structured_plans import causal_block_tables
from .token_pattern import pattern_bitmaps

DEFAULT_MAX_CHUNK_ELEMENTS = 1 << 24


def rows_per_chunk(batch: int, heads: int, kv_len: int, block_size: int, max_chunk_elements: int) -> int:
    """Query rows per chunk so that one chunk's scores ``[batch, heads, rows, kv_len]`` stay within
    ``max_chunk_elements`` (at least one block of rows; whole blocks so block lookups stay aligned)."""
    per_row = max(1, batch * heads * kv_len)
    blocks = max(1, max_chunk_elements // (per_row * block_size))
    return blocks * block_size


def block_sparse_attention_reference(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    plan: BlockSparsePlan,
    *,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
    is_causal: bool = False,
    enable_gqa: bool = False,
    kv_range: Tensor | None = None,
    q_offset: int = 0,
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Block-sparse attention in PyTorch.

    Args:
        query: ``[B, H, Lq, E]``.
        key: ``[B, KVH, Lk, E]``; ``H`` must be a multiple of ``KVH`` (``KVH < H`` needs ``enable_gqa``).
        value: ``[B, KVH, Lk, Ev]``.
        plan: kept key blocks per query block (see :class:`BlockSparsePlan`), validated here.
        attn_mask: bool (``True`` = attend) or float (added to scores), broadcastable to ``[B, H, Lq, Lk]``.
        scale: score scale, ``1 / sqrt(E)`` when ``None``.
        is_causal: causal masking inside partial blocks: query row ``i`` sees keys ``j <= i + q_offset``.
        kv_range: int32 ``[B, 2]``, per sequence the valid keys ``[start, end)`` (padding outside), or ``None``.
        q_offset: key position of query row 0 (``0``: SDPA's top-left alignment; ``Lk - Lq``: queries aligned
            to the end of the keys).
        max_chunk_elements: bound on the scores held at once.
        return_lse: also return each row's log-sum-exp of its kept scores, ``[B, H, Lq]`` float32 (float64 for
            float64 inputs), ``-inf`` for a row that keeps no key (what ring attention merges partial results by).

    Returns:
        ``[B, H, Lq, Ev]`` in ``query.dtype``, contiguous. Arithmetic in float32 (float64 for float64 inputs).
        With ``return_lse``, ``(out, lse)``.
    """
    batch, heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    check_heads(heads, kv_heads, enable_gqa)
    plan.validate(batch=batch, heads=heads, q_len=q_len, kv_len=kv_len)
    check_kv_range(kv_range, batch, query.device)
    group = heads // kv_heads
    block = plan.block_size
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    scale = softmax_scale(scale, head_dim)

    out = torch.full((batch, heads, q_len, value.shape[-1]), float("nan"), dtype=query.dtype, device=query.device)
    lse = torch.full((batch, heads, q_len), float("nan"), dtype=compute, device=query.device) if return_lse else None
    tables = TokenTables.build(plan, q_len, kv_len, is_causal, q_offset, kv_range)
    v = value.to(compute)
    mask = None if attn_mask is None else attn_mask.expand(batch, heads, q_len, kv_len)
    k_pos = torch.arange(kv_len, device=query.device)
    rows = rows_per_chunk(batch, heads, kv_len, block, max_chunk_elements)

    for start, stop, scores in score_chunks(query, key, scale, rows, compute):
        q_pos = torch.arange(start, stop, device=query.device)
        allowed = tables.allowed(q_pos, k_pos).expand(batch, heads, -1, -1)
        if mask is not None:
            rows_mask = mask[:, :, start:stop]
            if rows_mask.dtype == torch.bool:
                allowed = allowed & rows_mask
            else:
                scores = scores + rows_mask.to(compute)
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[:, :, start:stop] = _safe_softmax_matmul(scores, v, kv_heads, group).to(query.dtype)
        if lse is not None:
            lse[:, :, start:stop] = scores.logsumexp(-1)  # -inf where every score is
    return out if lse is None else (out, lse)


def score_chunks(
    query: Tensor, key: Tensor, scale: float, rows: int, compute: torch.dtype
) -> Iterator[tuple[int, int, Tensor]]:
    """Scaled scores of ``rows`` query rows at a time: ``(start, stop, scores [B, H, stop - start, Lk])`` in
    ``compute``.
    GQA reads each key head for its group of query heads (K is never repeated)."""
    heads, q_len = query.shape[1], query.shape[2]
    kv_heads = key.shape[1]
    k = key.to(compute)
    for start in range(0, q_len, rows):
        stop = min(start + rows, q_len)
        q = query[:, :, start:stop].to(compute).unflatten(1, (kv_heads, heads // kv_heads))
        scores = torch.einsum("bkgre,bkne->bkgrn", q, k).flatten(1, 2) * scale
        yield start, stop, scores


def check_heads(heads: int, kv_heads: int, enable_gqa: bool) -> None:
    """Raise ``ValueError`` unless ``kv_heads`` key heads can serve ``heads`` query heads."""
    if heads % kv_heads != 0 or (heads != kv_heads and not enable_gqa):
        raise ValueError(f"query heads ({heads}) and key heads ({kv_heads}) need enable_gqa and H % KVH == 0")


def check_kv_range(kv_range: Tensor | None, batch: int, device: torch.device) -> None:
    """Raise ``ValueError`` unless ``kv_range`` is ``None`` or an int32 ``[batch, 2]`` tensor on ``device``."""
    if kv_range is None:
        return
    if not isinstance(kv_range, Tensor) or kv_range.dtype != torch.int32 or tuple(kv_range.shape) != (batch, 2):
        raise ValueError(
            f"kv_range must be an int32 [batch={batch}, 2] tensor of [start, end) key positions, got "
            f"{getattr(kv_range, 'dtype', type(kv_range).__name__)} {tuple(getattr(kv_range, 'shape', ()))}"
        )
    if kv_range.device != device:
        raise ValueError(f"kv_range is on {kv_range.device}, the query on {device}")


@dataclass(frozen=True)
class TokenTables:
    """The plan and its token-level rules, ready to expand to ``[Bp, Hp, R, Lk]`` for any rows."""

    partial: Tensor
    full: Tensor
    block_size: int
    is_causal: bool
    q_offset: int
    bits: tuple[Tensor, Tensor] | None  # (diag_bits, col_bits) of a token pattern
    corner: Tensor | None  # [Hp, P, P] the pattern's true-mask corner
    kv_range: Tensor | None

    @classmethod
    def build(cls, plan, q_len, kv_len, is_causal, q_offset, kv_range) -> "TokenTables":
        partial, full = plan.block_tables(kv_len)
        bits = None
        if plan.has_token_pattern:
            bits = pattern_bitmaps(plan.token_diagonals, plan.token_columns, q_len, kv_len, q_offset)
        return cls(partial, full, plan.block_size, is_causal, q_offset, bits, plan.token_corner, kv_range)

    def allowed(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """bool ``[Bp', Hp', R, Lk]`` for query rows ``q_pos``. Partial blocks get the causal and pattern
        tests; full blocks are visible as a whole; keys outside a sequence's ``kv_range`` never are."""
        q_block, k_block = q_pos // self.block_size, k_pos // self.block_size
        allowed = self.partial[:, :, q_block][..., k_block]
        absolute = q_pos[:, None] + self.q_offset
        if self.is_causal:
            allowed = allowed & (k_pos[None, :] <= absolute)
        if self.bits is not None:
            diag_bits, col_bits = self.bits
            diag_index = absolute - k_pos[None, :] + k_pos.numel() - 1
            reachable = (diag_index >= 0) & (diag_index < diag_bits.shape[1])
            on_diagonal = diag_bits[:, diag_index.clamp(0, diag_bits.shape[1] - 1)].bool() & reachable
            on_pattern = on_diagonal | col_bits[:, None, :].bool()
            if self.corner is not None:
                pcl = self.corner.shape[-1]
                in_corner = (absolute < pcl) & (k_pos[None, :] < pcl)
                corner = self.corner[:, absolute.clamp(0, pcl - 1), k_pos.clamp(max=pcl - 1)[None, :]].bool()
                on_pattern = torch.where(in_corner[None], corner, on_pattern)
            allowed = allowed & on_pattern[None]
        allowed = allowed | self.full[:, :, q_block][..., k_block]
        if self.kv_range is not None:
            start, end = self.kv_range[:, 0, None], self.kv_range[:, 1, None]
            inside = (k_pos[None, :] >= start) & (k_pos[None, :] < end)
            allowed = allowed & inside[:, None, None, :]
        return allowed


def _safe_softmax_matmul(scores: Tensor, value: Tensor, kv_heads: int, group: int) -> Tensor:
    """softmax(scores) @ value with fully masked rows giving zeros. scores ``[B, H, R, Lk]``."""
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    weights = weights / torch.where(total > 0, total, torch.ones_like(total))
    weights = weights.unflatten(1, (kv_heads, group))
    return torch.einsum("bkgrn,bknd->bkgrd", weights, value).flatten(1, 2)


def token_mask(
    plan: BlockSparsePlan,
    q_len: int,
    kv_len: int,
    is_causal: bool,
    *,
    q_offset: int = 0,
    kv_range: Tensor | None = None,
) -> Tensor:
    """The plan expanded to a boolean ``[Bp, Hp, q_len, kv_len]`` token mask (``True`` = attend), with the
    causal and pattern tests inside partial blocks. Materialises ``q_len * kv_len``: for tests and small inputs."""
    tables = TokenTables.build(plan, q_len, kv_len, is_causal, q_offset, kv_range)
    device = plan.kv_num_blocks.device
    return tables.allowed(torch.arange(q_len, device=device), torch.arange(kv_len, device=device))


def density_per_head(plan: BlockSparsePlan, q_len: int, kv_len: int, is_causal: bool, q_offset: int = 0) -> Tensor:
    """float64 ``[Bp, Hp]``: kept blocks over the blocks dense attention would visit (all causal-visible)."""
    visible, _ = causal_block_tables(
        q_len, kv_len, plan.block_size, is_causal, plan.kv_num_blocks.device, q_offset=q_offset
    )
    return plan.kept_blocks().sum(-1).to(torch.float64) / max(1, int(visible.sum()))


def plan_density(plan: BlockSparsePlan, q_len: int, kv_len: int, is_causal: bool, q_offset: int = 0) -> float:
    """:func:`density_per_head` averaged over the plan's (batch, head) entries."""
    return float(density_per_head(plan, q_len, kv_len, is_causal, q_offset).mean())


__all__ = [
    "block_sparse_attention_reference",
    "check_kv_range",
    "density_per_head",
    "num_blocks",
    "plan_density",
    "rows_per_chunk",
    "token_mask",
]
