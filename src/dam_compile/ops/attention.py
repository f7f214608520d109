"""The ``torch.library`` custom ops that the graph pass inserts.

- ``dam::sparse_attention``: attention over a block-sparse plan; a drop-in for
  ``scaled_dot_product_attention`` (same argument meaning, no dropout) that picks its path at run time.
- ``dam::dynamic_plan`` (DAM per input), ``dam::pattern_plan`` (calibrated DAM), ``dam::dense_plan``,
  ``dam::streaming_plan``: the prefill mask-generation ops, producing the plan tensors;
- ``dam::decode_plan``: the kept blocks of a decode step (one query row), for every source.

The plan ops build nothing when the attention will run dense (short inputs), so short prompts pay no mask
cost. The dynamic and decode plans are plain PyTorch; on CUDA they run through ``torch.compile`` (compiled
once for all lengths and layers, outside the model's graph, which keeps the model's compile time down).

Each has a fake implementation so Dynamo, AOTAutograd and Inductor can trace it with symbolic shapes.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from dam_compile.plan import plan_stats
from dam_compile.dynamic.adaptive_plan_kernel import fused_plan_runs
from dam_compile.dynamic.estimators import estimator_spec
from dam_compile.kernels.block_sparse_launch import triton_block_sparse_attention
from dam_compile.kernels.decode_kernel import triton_sparse_decode
from dam_compile.dynamic.decode_plan import decode_block_plan
from dam_compile.kernels.constants import MAX_HEAD_DIM
from .dispatch import FUSED_DTYPES, choose_path, record
from dam_compile.dynamic.dynamic_plan import dynamic_block_plan, dynamic_plan_width
from dam_compile.kernels.hopper_launch import CallFlags, launch_kept
from .key_padding import padding_inputs, range_mask
from dam_compile.kernels.common import interpreting
from dam_compile.kernels.lean_op import lean_op
from dam_compile.plan.block_plan import BlockSparsePlan, num_blocks
from dam_compile.plan.defaults import DEFAULT_BLOCK_SIZE
from dam_compile.plan.reference import block_sparse_attention_reference
from dam_compile.plan.pattern_plan import cached_pattern_plan
from dam_compile.plan.structured_plans import dense_plan, streaming_plan

PlanTensors = tuple[Tensor, Tensor, Tensor, Tensor]
# SDPA tries flash before cuDNN; on Hopper cuDNN is the faster dense prefill kernel (0.98 vs 1.72 ms at 8K, causal
# bf16). The others stay as fallbacks for what cuDNN does not take.
DENSE_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@lean_op("dam::sparse_attention")
def sparse_attention_op(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    kv_num_blocks: Tensor,
    kv_indices: Tensor,
    full_kv_num_blocks: Optional[Tensor],
    full_kv_indices: Optional[Tensor],
    token_diagonals: Optional[Tensor],
    token_columns: Optional[Tensor],
    token_corner: Optional[Tensor],
    attn_mask: Optional[Tensor],
    scale: Optional[float],
    is_causal: bool,
    enable_gqa: bool,
    block_size: int,
    min_seq_len: int,
    kernel: str,
    kv_range: Optional[Tensor] = None,
    q_offset: int = 0,
    padding_kind: Optional[Tensor] = None,
) -> Tensor:
    """Shapes: query ``[B, H, Lq, E]``, key ``[B, KVH, Lk, E]``, value ``[B, KVH, Lk, Ev]`` -> ``[B, H, Lq, Ev]``
    (contiguous). The plan tensors follow :class:`BlockSparsePlan`; ``kv_range`` and ``q_offset`` are those of
    :func:`triton_block_sparse_attention`. The dense path (short inputs, no fused kernel) is SDPA, which takes
    ``kv_range`` but not ``q_offset`` (callers that set it use ``min_seq_len=0``).

    ``padding_kind`` (CPU int64 ``[1]``, from ``dam::key_padding``): ``attn_mask`` (a key padding row, with
    ``is_causal``) and ``kv_range`` then describe the same padding, and the call uses the cheaper exact one
    (:func:`.key_padding.padding_inputs`): neither when every key is valid."""
    if padding_kind is not None:
        attn_mask, kv_range = padding_inputs(int(padding_kind), attn_mask, kv_range, query.shape[0])
    path, reason = choose_path(query, key, min_seq_len, kernel)
    record(path, reason, key.shape[-2], min_seq_len)
    if plan_stats.recording():  # a benchmark measuring the plans that ran; one list check otherwise
        plan = BlockSparsePlan(kv_num_blocks, kv_indices, block_size, full_kv_num_blocks, full_kv_indices)
        plan_stats.record(plan, query.shape[-2], key.shape[-2], is_causal, q_offset, path == "dense")
    if path == "dense":
        if q_offset != 0:
            raise ValueError("q_offset needs the sparse path; this call runs dense: " + reason)
        return dense_attention(query, key, value, attn_mask, scale, is_causal, enable_gqa, kv_range, block_size)
    if path == "triton" and query.shape[-2] == 1 and kv_range is None:
        # A decode plan keeps whole blocks of one row; the decode kernel reads only those.
        return triton_sparse_decode(
            query, key, value, kv_num_blocks, kv_indices, block_size, attn_mask=attn_mask, scale=scale,
            enable_gqa=enable_gqa,
        )
    if path == "triton" and attn_mask is None and token_diagonals is None:
        # A repeat of a call the Hopper path took: straight to its kept launch (host time per layer).
        result = launch_kept(query, key, value, (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices),
                             kv_range, CallFlags(block_size, q_offset, scale, is_causal, enable_gqa, False))
        if result is not None:
            return result
    plan = BlockSparsePlan(
        kv_num_blocks, kv_indices, block_size, full_kv_num_blocks, full_kv_indices, token_diagonals, token_columns,
        token_corner,
    )
    options = dict(attn_mask=attn_mask, scale=scale, is_causal=is_causal, enable_gqa=enable_gqa,
                   kv_range=kv_range, q_offset=q_offset)
    if path == "triton":
        # The graph's own plan ops produced the plan: shapes are checked, index values trusted (no sync).
        return triton_block_sparse_attention(query, key, value, plan, check_plan=False, **options)
    return block_sparse_attention_reference(query, key, value, plan, **options).contiguous()


def dense_attention(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], scale: Optional[float], is_causal: bool,
    enable_gqa: bool, kv_range: Optional[Tensor] = None, block_size: int = DEFAULT_BLOCK_SIZE,
) -> Tensor:
    """SDPA, contiguous. With a mask and grouped K/V heads the heads are repeated first, as the model would have
    done before the pass read its K/V before ``repeat_kv``: SDPA's fast kernels take GQA only without a mask. A
    mask with ``is_causal`` (the pass's reading of a causal-and-padding mask: its key row) is joined into one
    mask, which SDPA requires.

    ``kv_range`` (int32 ``[B, 2]``, each sequence's valid keys): where the fused kernel runs (CUDA, float16 or
    bfloat16) it runs every visible block of ``block_size`` keys with the range, reading no mask (SDPA has no
    such argument: it would need the ``[B, 1, Lq, Lk]`` mask); elsewhere the range becomes a key mask."""
    if kv_range is not None:
        if attn_mask is None and _fused_dense_runs(query, value):
            plan = _dense_plan(query.shape[-2], key.shape[-2], block_size, is_causal, query.device)
            return triton_block_sparse_attention(query, key, value, plan, scale=scale, is_causal=is_causal,
                                                 enable_gqa=enable_gqa, kv_range=kv_range, check_plan=False)
        inside = range_mask(kv_range, key.shape[-2])
        attn_mask = inside if attn_mask is None else (
            attn_mask & inside if attn_mask.dtype == torch.bool
            else attn_mask.masked_fill(~inside, torch.finfo(attn_mask.dtype).min))
    if attn_mask is not None and is_causal:
        causal = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
        attn_mask = (attn_mask & causal if attn_mask.dtype == torch.bool
                     else attn_mask.masked_fill(~causal, torch.finfo(attn_mask.dtype).min))
        is_causal = False
    if enable_gqa and attn_mask is not None and key.shape[1] != query.shape[1]:
        group = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
        enable_gqa = False
    # A decode step takes SDPA's own choice, as eager and Inductor do: cuDNN builds an execution graph per new key
    # length, and a decode step's key length is new at every step.
    prefill = query.is_cuda and query.shape[-2] > 1
    with sdpa_kernel(DENSE_BACKENDS, set_priority=True) if prefill else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
        )
    return out.contiguous()


def _fused_dense_runs(query: Tensor, value: Tensor) -> bool:
    """Whether the fused kernel takes a dense call: CUDA float16/bfloat16 (or the CPU interpreter's tests)."""
    return (query.is_cuda or interpreting()) and query.dtype in FUSED_DTYPES \
        and query.shape[-1] == value.shape[-1] <= MAX_HEAD_DIM


@functools.lru_cache(maxsize=8)
def _dense_plan(q_len: int, kv_len: int, block_size: int, is_causal: bool, device: torch.device) -> BlockSparsePlan:
    """Every visible block, built once per length (a padded batch's dense calls, one per layer)."""
    return dense_plan(q_len, kv_len, block_size, is_causal, device)


@sparse_attention_op.register_fake
def _(query, key, value, *args, **kwargs) -> Tensor:
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


@lean_op("dam::dense_plan")
def dense_plan_op(
    query: Tensor, key: Tensor, block_size: int, is_causal: bool, min_seq_len: int, kernel: str
) -> PlanTensors:
    """Every visible block of a ``[B, H, Lq, E]`` query against ``[B, KVH, Lk, E]`` keys (density 1.0)."""
    return _plan_unless_dense(
        query, key, block_size, min_seq_len, kernel,
        lambda: dense_plan(query.shape[-2], key.shape[-2], block_size, is_causal, query.device),
    )


@lean_op("dam::streaming_plan")
def streaming_plan_op(
    query: Tensor, key: Tensor, block_size: int, is_causal: bool, min_seq_len: int, kernel: str,
    sink_blocks: int, local_blocks: int,
) -> PlanTensors:
    """Sink + local-window blocks (see :func:`streaming_plan`)."""
    return _plan_unless_dense(
        query, key, block_size, min_seq_len, kernel,
        lambda: streaming_plan(
            query.shape[-2], key.shape[-2], block_size, is_causal, sink_blocks, local_blocks, query.device
        ),
    )


def _plan_unless_dense(
    query: Tensor, key: Tensor, block_size: int, min_seq_len: int, kernel: str, build: Callable[[], BlockSparsePlan]
) -> PlanTensors:
    """The plan, or, when ``dam::sparse_attention`` will take its dense path for this query (the same
    :func:`choose_path` rule), a valid plan that keeps nothing, built without launching a kernel per index."""
    path, _ = choose_path(query, key, min_seq_len, kernel)
    if path != "dense":
        plan = build()  # block-level sources: dense/streaming plans always carry full blocks, no pattern
        return plan.kv_num_blocks, plan.kv_indices, plan.full_kv_num_blocks, plan.full_kv_indices
    return _keep_nothing(_uninitialized_broadcast_plan(query, key, block_size))


def _keep_nothing(lists: PlanTensors) -> PlanTensors:
    """Plan buffers turned into a plan that keeps no block: zero counts, the index lists (never read then) left
    as they are. Out of place, so the plan ops' code also traces into functional graphs (decompositions)."""
    return torch.zeros_like(lists[0]), lists[1], torch.zeros_like(lists[2]), lists[3]


def _uninitialized_broadcast_plan(query: Tensor, key: Tensor, block_size: int, *args) -> PlanTensors:
    """Plan tensors of the right shapes (``[1, 1, Mq]``, ``[1, 1, Mq, Nk]``), contents unset: the plan ops'
    fake implementation, and the buffers of the keep-nothing plan."""
    mq, nk = num_blocks(query.shape[-2], block_size), num_blocks(key.shape[-2], block_size)
    return (
        query.new_empty((1, 1, mq), dtype=torch.int32),
        query.new_empty((1, 1, mq, nk), dtype=torch.int32),
        query.new_empty((1, 1, mq), dtype=torch.int32),
        query.new_empty((1, 1, mq, nk), dtype=torch.int32),
    )


dense_plan_op.register_fake(_uninitialized_broadcast_plan)
streaming_plan_op.register_fake(_uninitialized_broadcast_plan)


@lean_op("dam::pattern_plan")
def pattern_plan_op(
    query: Tensor, key: Tensor, diagonals: Tensor, columns: Tensor, corner: Tensor,
    block_size: int, is_causal: bool, min_seq_len: int, kernel: str,
) -> PlanTensors:
    """The calibrated DAM plan: the blocks of the extended mask of per-head patterns (``diagonals [H, R]``,
    ``columns [H, C]``, ``corner [H, P, P]``) for this query/key length, built once per length bucket. The
    block lists come out ``[1, H, Mq, Nk]`` wide (only the first ``counts`` entries are meaningful)."""
    path, _ = choose_path(query, key, min_seq_len, kernel)
    lists = _pattern_plan_buffers(query, key, diagonals, block_size)
    if path == "dense":
        return _keep_nothing(lists)
    plan = cached_pattern_plan(
        diagonals, columns, corner, query.shape[-2], key.shape[-2], block_size, is_causal
    )
    compacts = (plan.kv_num_blocks, plan.kv_indices, plan.full_kv_num_blocks, plan.full_kv_indices)
    return tuple(  # the compact lists padded to the buffers' widths (out of place: traceable)
        torch.nn.functional.pad(compact, (0, buffer.shape[-1] - compact.shape[-1])).to(buffer.dtype).expand_as(buffer).clone()
        for buffer, compact in zip(lists, compacts)
    )


def _pattern_plan_buffers(query: Tensor, key: Tensor, diagonals: Tensor, block_size: int, *args) -> PlanTensors:
    heads = diagonals.shape[0]
    mq, nk = num_blocks(query.shape[-2], block_size), num_blocks(key.shape[-2], block_size)
    counts = query.new_empty((1, heads, mq), dtype=torch.int32)
    indices = query.new_empty((1, heads, mq, nk), dtype=torch.int32)
    return counts, indices, torch.empty_like(counts), torch.empty_like(indices)


@pattern_plan_op.register_fake
def _(query, key, diagonals, columns, corner, block_size, *args) -> PlanTensors:
    return _pattern_plan_buffers(query, key, diagonals, block_size)


_compiled: dict[Callable, Callable] = {}


def compiled_planner(fn: Callable, device: torch.device) -> Callable:
    """``fn`` compiled once with dynamic shapes on CUDA (a handful of fused kernels instead of dozens of
    launches); eager elsewhere (CPU tests), and while a CUDA graph is being captured (``mode="reduce-overhead"``):
    a capture does not survive a nested compiled call, and in a graph the eager launches cost no host time."""
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return fn
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _compiled[fn]


@lean_op("dam::dynamic_plan")
def dynamic_plan_op(
    query: Tensor, key: Tensor, block_size: int, is_causal: bool, min_seq_len: int, kernel: str,
    scale: Optional[float], tau: float, box_cox_lambda: float, mu: float, density: float, mass_target: float,
    sink_blocks: int, local_blocks: int, estimator: str,
) -> PlanTensors:
    """The dynamic DAM plan (:func:`dynamic_block_plan`) of a ``[B, H, Lq, E]`` query, lists ``[B, H, Mq, K]``;
    when the attention will run dense, a plan that keeps nothing (nothing is computed). An estimator with a fused
    plan (Triton kernels: the same lists as the definition, no compile step, no host sync) takes it on CUDA where
    ``fused_plan_runs``; the others run the definition compiled once (:func:`compiled_planner`)."""
    path = choose_path(query, key, min_seq_len, kernel)[0]
    if path == "dense":
        return _keep_nothing(_dynamic_plan_buffers(query, key, block_size, density, sink_blocks, local_blocks,
                                                   estimator))
    options = dict(block_size=block_size, is_causal=is_causal, scale=scale, tau=tau, box_cox_lambda=box_cox_lambda,
                   mu=mu, density=density, mass_target=mass_target, sink_blocks=sink_blocks,
                   local_blocks=local_blocks)
    fused = estimator_spec(estimator).fused_plan
    if fused is not None and path != "reference" and fused_plan_runs(query, block_size):
        return fused(query, key, **options)
    return compiled_planner(dynamic_block_plan, query.device)(query, key, **options, estimator=estimator)


def _dynamic_plan_buffers(query: Tensor, key: Tensor, block_size: int, density: float, sink_blocks: int,
                          local_blocks: int, estimator: str) -> PlanTensors:
    mq, nk = num_blocks(query.shape[-2], block_size), num_blocks(key.shape[-2], block_size)
    width = dynamic_plan_width(nk, density, sink_blocks, local_blocks, estimator)
    counts = query.new_empty((*query.shape[:2], mq), dtype=torch.int32)
    indices = query.new_empty((*query.shape[:2], mq, width), dtype=torch.int32)
    return counts, indices, torch.empty_like(counts), torch.empty_like(indices)


@dynamic_plan_op.register_fake
def _(query, key, block_size, is_causal, min_seq_len, kernel, scale, tau, box_cox_lambda, mu, density, mass_target,
      sink_blocks, local_blocks, estimator) -> PlanTensors:
    return _dynamic_plan_buffers(query, key, block_size, density, sink_blocks, local_blocks, estimator)


@lean_op("dam::decode_plan")
def decode_plan_op(
    query: Tensor, key: Tensor, attn_mask: Optional[Tensor], diagonals: Optional[Tensor],
    columns: Optional[Tensor], source: str, block_size: int, min_seq_len: int, kernel: str, sink_blocks: int,
    local_blocks: int, density: float, scale: Optional[float], corner_len: int,
    dynamic_heads: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Kept blocks of a decode step (:func:`decode_block_plan`): ``([B, H, 1], [B, H, 1, Nk])``; a plan that
    keeps nothing when the step runs dense (a short cache). ``dynamic_heads`` (bool ``[H]``, calibrated
    source): heads that select blocks as the dynamic source does."""
    if choose_path(query, key, min_seq_len, kernel)[0] == "dense":
        counts, indices = _decode_plan_buffers(query, key, block_size)
        return torch.zeros_like(counts), indices
    return compiled_planner(decode_block_plan, query.device)(
        query, key, attn_mask, diagonals, columns, source=source, block_size=block_size, sink_blocks=sink_blocks,
        local_blocks=local_blocks, density=density, scale=scale, corner_len=corner_len, dynamic_heads=dynamic_heads,
    )


def _decode_plan_buffers(query: Tensor, key: Tensor, block_size: int, *args) -> tuple[Tensor, Tensor]:
    nk = num_blocks(key.shape[-2], block_size)
    return (query.new_empty((*query.shape[:2], 1), dtype=torch.int32),
            query.new_empty((*query.shape[:2], 1, nk), dtype=torch.int32))


@decode_plan_op.register_fake
def _(query, key, attn_mask, diagonals, columns, source, block_size, *args) -> tuple[Tensor, Tensor]:
    return _decode_plan_buffers(query, key, block_size)


def sparse_attention(
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
    min_seq_len: int = 0,
    kernel: str = "auto",
) -> Tensor:
    """Block-sparse attention through ``torch.ops.dam.sparse_attention``.

    Args:
        query: ``[B, H, Lq, E]``; key ``[B, KVH, Lk, E]``; value ``[B, KVH, Lk, Ev]``.
        plan: the kept key blocks (:class:`BlockSparsePlan`).
        attn_mask, scale, is_causal, enable_gqa: as in ``scaled_dot_product_attention``.
        kv_range: int32 ``[B, 2]``: per sequence the valid keys ``[start, end)`` (padding without a mask).
        q_offset: key position of query row 0 (``0``: SDPA's top-left alignment; ``Lk - Lq``: queries aligned
            to the end of the keys).
        min_seq_len: attention over fewer keys than this runs dense.
        kernel: ``'auto'``, ``'triton'`` or ``'reference'`` (see :func:`choose_path`).

    Returns:
        ``[B, H, Lq, Ev]``.
    """
    return torch.ops.dam.sparse_attention(
        query, key, value, *plan.as_op_args(), attn_mask, scale, is_causal, enable_gqa,
        plan.block_size, min_seq_len, kernel, kv_range, q_offset,
    )
