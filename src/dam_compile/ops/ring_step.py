"""One step of ring (context-parallel) attention over a block-sparse plan.

Ring attention gives each rank a shard of the queries and passes the key/value shards around the ranks; each
step attends the local queries (or a part of them) to the received keys and returns the output with its
log-sum-exp, and the ring merges the steps by their log-sum-exps. Here a step is our op on the received shard:

- ``dam::sparse_attention_lse``: block-sparse attention that also returns the log-sum-exp ``[B, H, Lq]``
  (float32; ``-inf`` and zeros for a row that keeps no key, which :func:`merge` leaves out), with ``q_offset`` (where
  the queries sit among the keys) and the calibrated source's token pattern;
- :class:`RankRows`: the rank's rows of the plan one process builds for the whole sequence (the kept key blocks
  of each of its query blocks, partial and full, and the token pattern), and :meth:`RankRows.attend`, a step's
  attention: the step's queries and keys are runs of consecutive tokens (a rank holds one or two chunks of the
  sequence); each pair of a query run and an earlier-or-equal key run is one call of the op with its cut of the
  rows, ``q_offset`` the runs' distance and the pattern moved to the key run's start, and the calls are merged
  by their log-sum-exps. A pair keeping no block computes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from dam_compile.kernels.block_sparse_launch import triton_block_sparse_attention
from dam_compile.plan.dam_patterns import HeadPatterns
from .dispatch import choose_path
from dam_compile.kernels.lean_op import lean_op
from dam_compile.plan.block_plan import PATTERN_PAD, BlockSparsePlan
from dam_compile.plan.reference import block_sparse_attention_reference


@lean_op("dam::sparse_attention_lse")
def sparse_attention_lse_op(
    query: Tensor, key: Tensor, value: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor,
    full_kv_num_blocks: Optional[Tensor], full_kv_indices: Optional[Tensor], token_diagonals: Optional[Tensor],
    token_columns: Optional[Tensor], token_corner: Optional[Tensor], scale: Optional[float], is_causal: bool,
    enable_gqa: bool, block_size: int, q_offset: int, kernel: str,
) -> tuple[Tensor, Tensor]:
    """``(out [B, H, Lq, Ev], lse [B, H, Lq] float32)`` of ``query [B, H, Lq, E]`` over the plan's blocks of
    ``key``/``value [B, KVH, Lk, E]``: the fused kernel where it runs, else the PyTorch reference (a ring step
    needs the log-sum-exp, which dense SDPA does not give)."""
    plan = BlockSparsePlan(kv_num_blocks, kv_indices, block_size, full_kv_num_blocks, full_kv_indices,
                           token_diagonals, token_columns, token_corner)
    options = dict(scale=scale, is_causal=is_causal, enable_gqa=enable_gqa, q_offset=q_offset)
    if choose_path(query, key, 0, kernel)[0] == "triton":
        return triton_block_sparse_attention(query, key, value, plan, check_plan=False, return_lse=True, **options)
    out, lse = block_sparse_attention_reference(query, key, value, plan, return_lse=True, **options)
    return out.contiguous(), lse.to(torch.float32)


@sparse_attention_lse_op.register_fake
def _(query, key, value, *args) -> tuple[Tensor, Tensor]:
    out = query.new_empty((*query.shape[:3], value.shape[-1]))
    return out, query.new_empty(query.shape[:3], dtype=torch.float32)


def sparse_attention_lse(query: Tensor, key: Tensor, value: Tensor, plan: BlockSparsePlan, *,
                         scale: float | None = None, is_causal: bool = False, enable_gqa: bool = False,
                         q_offset: int = 0, kernel: str = "auto") -> tuple[Tensor, Tensor]:
    """``(out [B, H, Lq, Ev], lse float32 [B, H, Lq])`` of ``query [B, H, Lq, E]`` over ``plan``'s blocks of
    ``key`` / ``value [B, KVH, Lk, E / Ev]``, through ``torch.ops.dam.sparse_attention_lse``."""
    return sparse_attention_lse_op(query, key, value, plan.kv_num_blocks, plan.kv_indices, plan.full_kv_num_blocks,
                                   plan.full_kv_indices, plan.token_diagonals, plan.token_columns, plan.token_corner,
                                   scale, is_causal, enable_gqa, plan.block_size, q_offset, kernel)


@dataclass(frozen=True)
class StepOptions:
    """What every call of a step shares: the score scale, grouped key/value heads, the kernel choice."""

    scale: float | None
    enable_gqa: bool
    kernel: str


@dataclass(frozen=True)
class RankRows:
    """A rank's rows of the whole sequence's plan: ``partial`` / ``full`` bool ``[B, H, Mq_rank, Nk]`` (the kept
    global key blocks of each of the rank's query blocks, in the rank's order; partial ones get the causal and
    token tests), ``positions`` int64 ``[Mq_rank * block_size]`` (the global position of each of the rank's
    tokens), and the calibrated source's token pattern (:class:`HeadPatterns`) in global positions, or
    ``None``."""

    partial: Tensor
    full: Tensor
    positions: Tensor
    block_size: int
    pattern: HeadPatterns | None = None

    def attend(self, q: Tensor, k: Tensor, v: Tensor, q_first: int, k_positions: Tensor,
               options: StepOptions) -> tuple[Tensor, Tensor, int]:
        """``(out [B, H, Lq, Ev], lse float32 [B, H, Lq], calls)``: the step's queries ``q [B, H, Lq, E]`` (the
        rank's tokens from its ``q_first``-th on) against keys ``k [B, KVH, Lk, E]`` / ``v [B, KVH, Lk, Ev]`` at
        global ``k_positions [Lk]``, over the rows' blocks (``calls``: the op calls made; a row that keeps no key:
        zeros and ``-inf``)."""
        outs, lses, calls = [], [], 0
        for q_start, q_at, q_len in position_runs(self.positions[q_first:q_first + q.shape[-2]]):
            pieces = []
            for k_start, k_at, k_len in position_runs(k_positions):
                if k_at > q_at + q_len - 1:
                    continue  # keys after every query of the run: causal, nothing to see
                plan = self.cut(q_first + q_start, q_len, k_at, k_len)
                if plan is not None:
                    calls += 1
                    pieces.append(sparse_attention_lse(
                        q[:, :, q_start:q_start + q_len], k[:, :, k_start:k_start + k_len],
                        v[:, :, k_start:k_start + k_len], plan, scale=options.scale, is_causal=True,
                        enable_gqa=options.enable_gqa, q_offset=q_at - k_at, kernel=options.kernel))
            out, lse = merge(pieces, (*q.shape[:2], q_len, v.shape[-1]), q)
            outs.append(out)
            lses.append(lse)
        return torch.cat(outs, dim=2), torch.cat(lses, dim=2), calls

    def cut(self, first: int, q_len: int, k_at: int, k_len: int) -> BlockSparsePlan | None:
        """The plan of the rank's tokens ``[first, first + q_len)`` against the sequence's keys
        ``[k_at, k_at + k_len)`` (whole blocks), ``None`` when it keeps no block."""
        block = self.block_size
        rows = torch.arange(first // block, (first + q_len) // block, device=self.partial.device)
        cols = torch.arange(k_at // block, (k_at + k_len) // block, device=self.partial.device)
        partial, full = self.partial[:, :, rows][..., cols], self.full[:, :, rows][..., cols]
        if not bool((partial | full).any()):
            return None
        plan = BlockSparsePlan.from_block_tables(partial, block, full)
        if self.pattern is None:
            return plan
        columns = self.pattern.columns  # diagonals are distances: the same at any offset
        moved = torch.where(columns == PATTERN_PAD, columns, columns - k_at)
        return plan.with_token_pattern(self.pattern.diagonals, moved, _moved_corner(self.pattern.corner, k_at))


def merge(pieces: list[tuple[Tensor, Tensor]], shape: tuple[int, ...], like: Tensor) -> tuple[Tensor, Tensor]:
    """Attention over the union of the pieces' keys from each piece's ``(out, lse)`` (rows no piece saw: zeros
    and ``-inf``)."""
    if not pieces:
        return like.new_zeros(shape), like.new_full(shape[:3], float("-inf"), dtype=torch.float32)
    lse = torch.stack([l for _, l in pieces]).logsumexp(0)
    safe = torch.where(torch.isfinite(lse), lse, 0.0)
    out = sum(o.float() * (l - safe).exp()[..., None] for o, l in pieces)
    return out.to(like.dtype), lse


def blocks_of(positions: Tensor, block_size: int) -> Tensor:
    """The global block index of each whole block of token ``positions`` (one entry per ``block_size`` tokens,
    which must be consecutive within each block)."""
    if positions.numel() % block_size:
        raise ValueError(f"ring shards must be whole blocks of {block_size} tokens, got {positions.numel()}")
    return torch.div(positions[::block_size], block_size, rounding_mode="floor")


def position_runs(positions: Tensor) -> list[tuple[int, int, int]]:
    """``(index, first position, length)`` of each run of consecutive positions."""
    breaks = (positions[1:] != positions[:-1] + 1).nonzero().flatten().add(1).tolist()
    starts, ends = [0, *breaks], [*breaks, positions.numel()]
    return [(s, int(positions[s]), e - s) for s, e in zip(starts, ends)]


def _moved_corner(corner: Tensor | None, k_at: int) -> Tensor | None:
    """The calibrated corner (the true mask of positions ``[0, P)^2``) seen from keys starting at ``k_at``: the
    part of it at or after ``k_at`` in both axes, or ``None`` when the keys start past it."""
    if corner is None or k_at >= corner.shape[-1]:
        return None
    return corner[:, k_at:, k_at:].contiguous()
