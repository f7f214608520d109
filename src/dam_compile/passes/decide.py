"""Step (b): decide per attention site whether the sparse op can stand in for it exactly, and why not."""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Number
from typing import Any

import torch
from torch.fx import Node

from dam_compile.kernels.constants import MAX_HEAD_DIM, SUPPORTED_DTYPES
from .find_sdpa import SDPASite



@dataclass(frozen=True)
class Decision:
    rewrite: bool
    reason: str


def example_value(arg: Any) -> Any:
    """The fake tensor (or constant) an FX argument stands for; ``None`` when the graph carries no metadata."""
    if isinstance(arg, Node):
        return arg.meta.get("example_value", arg.meta.get("val"))
    return arg


def op_scale(site: SDPASite) -> float | Node | None:
    """The site's scale as the dam ops take it: ``None``, a float, or the node of a symbolic float
    (``dynamic=True`` turns a module's float attribute into a graph input), passed on as it is."""
    return site.scale if site.scale is None or isinstance(site.scale, Node) else float(site.scale)


def decide(site: SDPASite) -> Decision:
    """Whether ``site`` can become ``dam::sparse_attention``. Every refusal names its reason; those sites keep
    running ``scaled_dot_product_attention`` unchanged."""
    reason = _refusal(site)
    if reason is not None:
        return Decision(False, reason)
    return Decision(True, "eligible: sparse or dense is chosen per call at run time")


def _refusal(site: SDPASite) -> str | None:
    if not isinstance(site.dropout_p, Number):
        return "dropout_p is not a constant"
    if site.dropout_p != 0:
        return f"dropout_p={site.dropout_p} (the sparse op has no dropout)"
    if not isinstance(site.is_causal, bool):
        return "is_causal is not a constant"
    if not isinstance(site.enable_gqa, bool):
        return "enable_gqa is not a constant"
    if not (site.scale is None or isinstance(site.scale, Number) or isinstance(example_value(site.scale), torch.SymFloat)):
        return f"scale is {type(example_value(site.scale)).__name__} (supported: a float, constant or symbolic)"

    q, k, v = (example_value(n) for n in (site.query, site.key, site.value))
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return "no shape information for query/key/value"
    if not (q.dim() == k.dim() == v.dim() == 4):
        return f"query/key/value are not 4-D [B, H, L, E] (got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D)"
    if any(t.requires_grad for t in (q, k, v)):
        return "query/key/value require grad (the sparse op is inference-only; run under torch.no_grad())"
    if q.dtype not in SUPPORTED_DTYPES or not (q.dtype == k.dtype == v.dtype):
        return f"dtype {q.dtype}/{k.dtype}/{v.dtype} (supported: float16, bfloat16, float32, all alike)"
    static = _static_head_dims(q, k, v)
    if static is None:
        return "symbolic head count or head dim"
    (hq, eq), (hk, ek), (hv, ev) = static
    if eq != ek or ek != ev:
        return f"head dims differ (query {eq}, key {ek}, value {ev})"
    if eq > MAX_HEAD_DIM:
        return f"head dim {eq} > {MAX_HEAD_DIM}"
    if hk != hv:
        return f"key has {hk} heads, value {hv}"
    # Batch sizes may be symbolic (padded batches); compare them as expressions, adding no guard.
    if not (str(q.shape[0]) == str(k.shape[0]) == str(v.shape[0])):
        return f"batch sizes may differ (query {q.shape[0]}, key {k.shape[0]}, value {v.shape[0]})"
    if hq % hk != 0 or (hq != hk and not site.enable_gqa):
        return f"{hq} query heads with {hk} key heads and enable_gqa={site.enable_gqa}"
    if site.is_causal and isinstance(q.shape[-2], int) and q.shape[-2] == 1:
        return "one query row with is_causal=True (SDPA's top-left alignment: it sees only key 0)"
    return _mask_refusal(site, q)


def _mask_refusal(site: SDPASite, q: torch.Tensor) -> str | None:
    if site.attn_mask is None:
        return None
    mask = example_value(site.attn_mask)
    if not isinstance(mask, torch.Tensor):
        return "attn_mask is not a tensor with known shape"
    if site.is_causal:
        return "attn_mask together with is_causal=True (SDPA rejects it; left to raise as before)"
    if mask.requires_grad:
        return "attn_mask requires grad"
    if mask.dtype != torch.bool and mask.dtype != q.dtype:
        return f"attn_mask dtype {mask.dtype} (supported: bool, or the query dtype {q.dtype})"
    if not 2 <= mask.dim() <= 4:
        return f"attn_mask is {mask.dim()}-D (supported: 2-D to 4-D, broadcastable to [B, H, Lq, Lk])"
    return None


def _static_head_dims(*tensors: torch.Tensor) -> list[tuple[int, int]] | None:
    dims = [(t.shape[1], t.shape[3]) for t in tensors]
    if not all(isinstance(d, int) for pair in dims for d in pair):
        return None
    return dims
