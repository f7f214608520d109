"""Host side of the fused kernel: checks the arguments, lays out the plan for it, picks a tile config, launches.

On a Hopper GPU a call the warp-specialised Gluon path covers goes there (:mod:`.hopper_launch`); everything
else runs the portable Triton kernel, whose tile config is autotuned per (head dim, plan block, masking mode,
dtype, power-of-two length) on CUDA; under ``TRITON_INTERPRET=1`` (CPU tests) one fixed config runs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
from torch import Tensor

from .block_sparse_kernel import block_sparse_attention_fwd
from .constants import MAX_HEAD_DIM, SUPPORTED_DTYPES
from .hopper_launch import (
    CallFlags,
    call_key,
    hopper_args,
    hopper_constants,
    hopper_unsupported,
    kept_launch,
    launch_hopper,
    run_kept,
)
from .common import (
    CallShape,
    capability,
    cdiv,
    dot_options,
    interpreting,
    next_power_of_2,
    plan_lists,
    softmax_scale,
    tma_aligned,
)
from dam_compile.plan.block_plan import BlockSparsePlan, PlanError
from dam_compile.plan.reference import check_heads, check_kv_range
from dam_compile.plan.token_pattern import pattern_bitmaps

try:  # host-side TMA descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None



class KernelConfig(NamedTuple):
    """Tile shape and launch parameters of one kernel variant."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def as_triton(self) -> triton.Config:
        return triton.Config(
            {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n}, num_warps=self.num_warps, num_stages=self.num_stages,
            pre_hook=set_tma_block_shapes,
        )


def set_tma_block_shapes(nargs: dict) -> None:
    """A K/V descriptor's box is one key tile, whose height the tile config picks."""
    for name in ("DescK", "DescV"):
        desc = nargs[name]
        if TensorDescriptor is not None and isinstance(desc, TensorDescriptor):
            desc.block_shape = [1, 1, nargs["BLOCK_N"], nargs["BLOCK_D"]]


# Candidates for Hopper (H100): 128-row tiles with 8 warps feed the wgmma units; 64-row ones keep occupancy
# for short or very sparse rows. Small tiles only serve small plan blocks.
_TUNE_CONFIGS = [
    KernelConfig(128, 128, 8, 3),
    KernelConfig(128, 128, 8, 2),
    KernelConfig(128, 64, 8, 3),
    KernelConfig(64, 64, 4, 3),
    KernelConfig(64, 128, 4, 3),
    KernelConfig(64, 32, 4, 3),
    KernelConfig(32, 32, 4, 2),
    KernelConfig(16, 16, 4, 2),
]


def _fits(config: KernelConfig, plan_block: int, block_d: int) -> bool:
    if config.block_m > plan_block or config.block_n > plan_block:
        return False
    # 256-wide heads: a 128x128 fp32 score tile plus a 128x256 accumulator spill registers.
    return not (block_d > 128 and config.block_m * config.block_n > 128 * 64)


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    plan_block, block_d = args["PLAN_BLOCK"], args["BLOCK_D"]
    fitting = [c for c in configs if _fits(_as_kernel_config(c), plan_block, block_d)]
    largest = max(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] for c in fitting)
    # Tiles far below what fits only lose; keep the larger ones to bound tuning time.
    return [c for c in fitting if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * 4 >= largest]


def _as_kernel_config(config: triton.Config) -> KernelConfig:
    return KernelConfig(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)


tuned_kernel = triton.autotune(
    configs=[c.as_triton() for c in _TUNE_CONFIGS],
    key=["HEAD_DIM", "PLAN_BLOCK", "IS_CAUSAL", "HAS_FULL", "HAS_PATTERN", "HAS_MASK", "HAS_KV_RANGE", "EVEN_N",
         "tune_len"],
    prune_configs_by={"early_config_prune": _prune},
)(block_sparse_attention_fwd)


def interpreter_config(plan_block: int) -> KernelConfig:
    """The one config the CPU interpreter runs: whole plan blocks (fewest Python-level steps), at most 64."""
    size = min(plan_block, 64)
    return KernelConfig(size, size, 4, 1)


def triton_block_sparse_attention(
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
    return_lse: bool = False,
    out: Tensor | None = None,
    check_plan: bool = True,
    config: KernelConfig | None = None,
    use_tma: bool | None = None,
    path: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Block-sparse attention through the fused Triton kernel.

    Args:
        query: ``[B, H, Lq, E]``, float16/bfloat16 (float32 runs with IEEE dots: for tests), any strides.
        key, value: ``[B, KVH, Lk, E]``; ``H % KVH == 0`` (``KVH < H`` needs ``enable_gqa``), never repeated.
        plan: kept key blocks (:class:`BlockSparsePlan`), optional full blocks and token pattern.
        attn_mask: bool (``True`` = attend) or float (added to scores), broadcastable to ``[B, H, Lq, Lk]``.
        scale: score scale, ``1 / sqrt(E)`` when ``None``.
        is_causal: query row ``i`` sees keys ``j <= i + q_offset`` inside partial blocks.
        kv_range: int32 ``[B, 2]``: per sequence the valid keys ``[start, end)``; padding needs no mask tensor.
        q_offset: key position of query row 0 (``0``: SDPA's top-left; ``Lk - Lq``: aligned to the end).
        return_lse: also return the log-sum-exp ``[B, H, Lq]`` (float32, natural log, ``-inf`` for empty rows).
        out: ``[B, H, Lq, E]`` buffer to write into (tests poison it first); a new one when ``None``.
        check_plan: also check the plan's index values (reads them: synchronises on CUDA). Shapes and dtypes
            are always checked.
        config: force one tile config instead of autotuning.
        use_tma: load K/V tiles through Hopper's tensor-memory accelerator; ``None`` picks it where it applies.
        path: ``"hopper"`` (the warp-specialised Gluon kernel of :mod:`.hopper_block_sparse_kernel`; raises
            ``ValueError`` saying why where it cannot take the call), ``"portable"`` (the Triton kernel, any GPU
            and the CPU interpreter), or ``None``: Hopper's where it applies and no ``config`` / ``use_tma`` asks
            for the portable kernel's options.

    Returns:
        ``out`` ``[B, H, Lq, E]`` in ``query.dtype``; rows that keep no key are zeros. With ``return_lse``,
        ``(out, lse)``.
    """
    # A repeat of an earlier call's shapes, strides and flags that took the Hopper path skips the checks it
    # passed and Triton's binder (host time: this runs once per layer per forward).
    repeatable = (attn_mask is None and out is None and not check_plan and config is None and use_tma is None
                  and path is None and not plan.has_token_pattern)
    cache_key = None
    if repeatable:
        lists = (plan.kv_num_blocks, plan.kv_indices, plan.full_kv_num_blocks, plan.full_kv_indices)
        flags = CallFlags(plan.block_size, q_offset, scale, is_causal, enable_gqa, return_lse)
        cache_key = call_key(query, key, value, lists, kv_range, flags)
        entry = kept_launch(cache_key)
        if entry is not None:
            return run_kept(entry, query, key, value, lists, kv_range, flags)
    shape = _check_call(query, key, value, plan, enable_gqa, kv_range, check_plan, use_tma)
    if out is None:
        out = query.new_empty((shape.batch, shape.heads, shape.q_len, shape.head_dim))
    elif out.shape != (shape.batch, shape.heads, shape.q_len, shape.head_dim) or out.dtype != query.dtype \
            or out.device != query.device:
        raise ValueError(f"out must be a {query.dtype} [{shape.batch}, {shape.heads}, {shape.q_len}, "
                         f"{shape.head_dim}] tensor on {query.device}")
    lse = query.new_empty(shape[:3], dtype=torch.float32) if return_lse else out
    if _takes_hopper_path(path, query, key, value, plan, attn_mask, config, use_tma):
        launch_hopper(hopper_args(query, key, value, out, lse, plan, shape, kv_range, q_offset, scale),
                      hopper_constants(query.dtype, plan, shape, kv_range, is_causal, return_lse), query.device,
                      cache_key=cache_key)
        return (out, lse) if return_lse else out
    tma = _tma_applies(key, value) if use_tma is None else use_tma
    args = kernel_args(query, key, value, out, lse, plan, shape, attn_mask, kv_range, q_offset, scale, tma)
    constants = kernel_constants(query.dtype, plan, shape, attn_mask, kv_range, is_causal, return_lse, tma)
    _launch(args, constants, shape, plan.block_size, config)
    return (out, lse) if return_lse else out


def _takes_hopper_path(
    path: str | None, query: Tensor, key: Tensor, value: Tensor, plan: BlockSparsePlan, attn_mask: Tensor | None,
    config: KernelConfig | None, use_tma: bool | None,
) -> bool:
    if path not in (None, "hopper", "portable"):
        raise ValueError(f"path must be 'hopper', 'portable' or None, got {path!r}")
    if path == "portable" or (path is None and (config is not None or use_tma is False)):
        return False
    why_not = hopper_unsupported(query, key, value, plan, attn_mask)
    if path == "hopper" and why_not is not None:
        raise ValueError(f"path='hopper' cannot take this call: {why_not}")
    return why_not is None


def _check_call(
    query: Tensor, key: Tensor, value: Tensor, plan: BlockSparsePlan, enable_gqa: bool, kv_range: Tensor | None,
    check_plan: bool, use_tma: bool | None,
) -> CallShape:
    """The call's sizes; raises ``ValueError`` / :class:`PlanError` naming what the kernel cannot take."""
    shape = _check_inputs(query, key, value, enable_gqa)
    plan.validate(batch=shape.batch, heads=shape.heads, q_len=shape.q_len, kv_len=shape.kv_len,
                  check_values=check_plan)
    if plan.kv_num_blocks.device != query.device:
        raise PlanError(f"plan is on {plan.kv_num_blocks.device}, the query on {query.device}")
    check_kv_range(kv_range, shape.batch, query.device)
    if plan.block_size < 16 or plan.block_size & (plan.block_size - 1):
        raise PlanError(f"the fused kernel needs a power-of-two plan block_size >= 16, got {plan.block_size}")
    if use_tma and not _tma_applies(key, value):
        raise ValueError("use_tma=True needs a CUDA GPU of compute capability >= 9, head dim 64 or 128 and K/V "
                         "with a contiguous last dim and 16-byte aligned strides")
    return shape


def kernel_args(
    query: Tensor, key: Tensor, value: Tensor, out: Tensor, lse: Tensor, plan: BlockSparsePlan, shape: CallShape,
    attn_mask: Tensor | None, kv_range: Tensor | None, q_offset: int, scale: float | None, tma: bool,
) -> dict[str, object]:
    """The kernel's non-constexpr arguments by name: each operand with its strides as one tuple (see
    :func:`block_sparse_attention_fwd`). Absent operands are stand-in pointers the kernel never reads.
    With :func:`kernel_constants`, what a launch passes (``benchmarks/kernel_resources.py`` compiles from them)."""
    partial, full = plan_lists(plan, shape)
    desc_k, desc_v = (_descriptor(key), _descriptor(value)) if tma else (key, value)
    return dict(
        Q=query, q_strides=query.stride(), K=key, k_strides=key.stride(), V=value, v_strides=value.stride(),
        Out=out, o_strides=out.stride(), Lse=lse, partial_lists=partial, full_lists=full,
        mask=_mask_operand(attn_mask, query, shape), pattern=_pattern_operand(plan, shape, q_offset, query),
        KvRange=query if kv_range is None else kv_range, DescK=desc_k, DescV=desc_v,
        heads=shape.heads, group=shape.heads // shape.kv_heads, q_len=shape.q_len, kv_len=shape.kv_len,
        q_offset=q_offset, sm_scale=float(softmax_scale(scale, shape.head_dim)),  # float: Triton types an int i32
        tune_len=next_power_of_2(max(shape.q_len, shape.kv_len, 1024)),
    )


def kernel_constants(
    dtype: torch.dtype, plan: BlockSparsePlan, shape: CallShape, attn_mask: Tensor | None, kv_range: Tensor | None,
    is_causal: bool, return_lse: bool, tma: bool,
) -> dict[str, object]:
    """The kernel's constexprs but the tile config's ``BLOCK_M`` / ``BLOCK_N``."""
    return dict(
        HEAD_DIM=shape.head_dim, BLOCK_D=max(16, next_power_of_2(shape.head_dim)), PLAN_BLOCK=plan.block_size,
        IS_CAUSAL=is_causal, HAS_FULL=plan.has_full_blocks, HAS_PATTERN=plan.has_token_pattern,
        HAS_MASK=attn_mask is not None, MASK_IS_BOOL=attn_mask is not None and attn_mask.dtype == torch.bool,
        HAS_KV_RANGE=kv_range is not None, EVEN_N=shape.kv_len % plan.block_size == 0, WRITE_LSE=return_lse,
        USE_TMA=tma, **dot_options(dtype),
    )


def _launch(
    args: dict[str, object], constants: dict[str, object], shape: CallShape, plan_block: int,
    config: KernelConfig | None,
) -> None:
    """Run the kernel: autotuned on CUDA, the interpreter's one config on the CPU, or the forced ``config``."""
    if config is None and interpreting():
        config = interpreter_config(plan_block)
    if config is None:
        grid = lambda meta: (shape.batch * shape.heads, cdiv(shape.q_len, meta["BLOCK_M"]))  # noqa: E731
        tuned_kernel[grid](**args, **constants)
        return
    if plan_block % config.block_m or plan_block % config.block_n:
        raise ValueError(f"config tiles {config[:2]} must divide the plan block_size {plan_block}")
    set_tma_block_shapes({**args, **constants, "BLOCK_N": config.block_n})
    block_sparse_attention_fwd[(shape.batch * shape.heads, cdiv(shape.q_len, config.block_m))](
        **args, **constants, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


def _tma_applies(key: Tensor, value: Tensor) -> bool:
    if TensorDescriptor is None or interpreting() or not key.is_cuda or key.shape[-1] not in (64, 128):
        return False
    return capability(key.device)[0] >= 9 and tma_aligned(key) and tma_aligned(value)


def _descriptor(t: Tensor) -> "TensorDescriptor":
    # The box is set per tile config (see set_tma_block_shapes); this one is a placeholder.
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 16, t.shape[-1]])


def _check_inputs(query: Tensor, key: Tensor, value: Tensor, enable_gqa: bool) -> CallShape:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D [B, heads, L, E] tensor, got {getattr(t, 'shape', type(t))}")
        if t.dtype != query.dtype or t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} is {t.dtype}; query, key and value must share one of {SUPPORTED_DTYPES}")
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device}, the query on {query.device}")
    batch, heads, q_len, head_dim = query.shape
    kv_batch, kv_heads, kv_len, _ = key.shape
    if key.shape[-1] != head_dim or value.shape[-1] != head_dim or tuple(value.shape[:3]) != tuple(key.shape[:3]):
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must match query head dim {head_dim}")
    if kv_batch != batch:
        raise ValueError(f"key batch {kv_batch} differs from query batch {batch}")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head dim {head_dim} is over {MAX_HEAD_DIM}")
    check_heads(heads, kv_heads, enable_gqa)
    return CallShape(batch, heads, q_len, head_dim, kv_heads, kv_len)


def _mask_operand(attn_mask: Tensor | None, query: Tensor, shape: CallShape) -> tuple:
    """``(mask [B, H, Lq, Lk] view, its strides)``; the query as a stand-in without a mask."""
    if attn_mask is None:
        return query, (0, 0, 0, 0)
    if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
        raise ValueError(f"attn_mask must be bool or {query.dtype} (the query's dtype), got {attn_mask.dtype}")
    if attn_mask.device != query.device:
        raise ValueError(f"attn_mask is on {attn_mask.device}, the query on {query.device}")
    try:
        view = attn_mask.expand(shape.batch, shape.heads, shape.q_len, shape.kv_len)
    except RuntimeError as err:
        raise ValueError(f"attn_mask {tuple(attn_mask.shape)} does not broadcast to "
                         f"[{shape.batch}, {shape.heads}, {shape.q_len}, {shape.kv_len}]") from err
    return view, view.stride()


def _pattern_operand(plan: BlockSparsePlan, shape: CallShape, q_offset: int, query: Tensor) -> tuple:
    """``(diagonal bits, column bits, their head strides, diagonal length, corner, its head stride, corner
    length)`` of the plan's token pattern (head stride 0 when one head's pattern serves all); stand-ins and
    zero lengths without one."""
    if not plan.has_token_pattern:
        return query, query, (0, 0), 0, query, 0, 0
    diag_bits, col_bits = pattern_bitmaps(plan.token_diagonals, plan.token_columns, shape.q_len, shape.kv_len,
                                          q_offset)
    strides = (diag_bits.stride(0) if diag_bits.shape[0] > 1 else 0, col_bits.stride(0) if col_bits.shape[0] > 1 else 0)
    corner = plan.token_corner
    if corner is None:
        return diag_bits, col_bits, strides, diag_bits.shape[1], query, 0, 0
    corner = corner.contiguous()
    if corner.dtype == torch.bool:
        corner = corner.view(torch.int8)
    return (diag_bits, col_bits, strides, diag_bits.shape[1], corner, corner.stride(0) if corner.shape[0] > 1 else 0,
            corner.shape[-1])


__all__ = ["KernelConfig", "interpreting", "triton_block_sparse_attention"]
