"""The fidelity benchmark's eager baselines, through ``generate()``: StreamingLLM, the oracle and random blocks.

:class:`BaselineAttention` intercepts every ``scaled_dot_product_attention`` call of the model and runs it
through ``dam_compile.sparse_attention`` (our op and kernels) with the baseline's plan, for both kinds of call
``generate()`` makes: the prefill (causal self-attention over the prompt) and each decode step (the newest
token's row against the whole KV cache). Each kind keeps about its target density of the blocks the call can
see:

- ``streaming``: the sink block and a window ending at the row;
- ``oracle``: per row (prefill: per query block) the blocks holding the most exact attention mass;
- ``random``: random blocks, always with the sink block and the row's own block.

HuggingFace's SDPA calls differ between versions (5.17 repeats K/V heads and may hand a mask, 5.24 passes
``enable_gqa`` and no mask for one unpadded prompt): a mask is accepted only when it says exactly what
``is_causal`` (prefill) or "every cached key" (decode) says, and anything else is refused by name.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

import dam_compile
from dam_compile.plan.block_plan import BlockSparsePlan, num_blocks
from dam_compile.dynamic.block_estimates import last_rows_block_mass
from dam_compile.plan.structured_plans import causal_block_tables
from dam_compile.metrics import top_mass_plan
from dam_compile.module_stack import AttentionCallMode
from bench_plans import density_matched_streaming_plan, random_plan

BASELINES = ("streaming", "oracle", "random")


def allowed_keys(mask: Tensor) -> Tensor:
    """A bool or additive float SDPA mask as a bool "may attend" mask (HF fills masked cells with the dtype's
    minimum)."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def call_kind(name: str, a: dict[str, Any]) -> str:
    """``"prefill"`` or ``"decode"`` for one bound SDPA call, or ``ValueError`` for a call the baselines cannot
    run exactly (padding, a query chunk against a longer cache, a mask that is not plain causal)."""
    q_len, kv_len, mask = a["query"].shape[-2], a["key"].shape[-2], a["attn_mask"]
    if q_len == kv_len > 1:
        if a["is_causal"] and mask is None:
            return "prefill"
        causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=a["query"].device).tril()
        if not a["is_causal"] and mask is not None and bool((allowed_keys(mask) == causal).all()):
            return "prefill"
    if q_len == 1 and not a["is_causal"] and (mask is None or bool(allowed_keys(mask).all())):
        return "decode"
    shape = None if mask is None else tuple(mask.shape)
    raise ValueError(f"{name or 'attention'}: the baselines run causal self-attention over one unpadded prompt or "
                     f"one decode row against its cache; got {q_len} queries, {kv_len} keys, "
                     f"is_causal={a['is_causal']}, attn_mask {shape}")


def decode_budget(kv_len: int, block_size: int, density: float) -> int:
    """Blocks a decode row keeps at ``density`` of its ``ceil(kv_len / block_size)`` blocks (at least one)."""
    return max(1, round(density * num_blocks(kv_len, block_size)))


def row_block_mass(query: Tensor, key: Tensor, block_size: int, scale: float | None) -> Tensor:
    """float32 ``[B, H, Nk]``: the exact softmax mass of the one-row ``query [B, H, 1, E]`` in each key block of
    ``key [B, KVH, Lk, E]`` (grouped heads allowed), in float32."""
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    # The newest row sees every cached key: no causal cut.
    return last_rows_block_mass(query.float(), key.float(), block_size, False, scale)


def decode_plan(kind: str, query: Tensor, key: Tensor, block_size: int, density: float, scale: float | None,
                generator: torch.Generator | None) -> BlockSparsePlan:
    """The baseline's blocks for one decode row: ``[B, H, 1, Nk]`` tables of whole blocks (no causal cut: the
    row is the newest key)."""
    batch, heads = query.shape[:2]
    nk, budget = num_blocks(key.shape[-2], block_size), decode_budget(key.shape[-2], block_size, density)
    blocks = torch.arange(nk, device=query.device)
    forced = (blocks == 0) | (blocks == nk - 1)  # sink and the row's own block
    if kind == "streaming":
        keep = ((blocks == 0) | (blocks >= nk - max(1, budget - 1)))[None, None].expand(1, 1, nk)
    elif kind == "oracle":
        mass = row_block_mass(query, key, block_size, scale)
        keep = torch.zeros_like(mass, dtype=torch.bool).scatter(-1, mass.topk(min(budget, nk), -1).indices, True)
    elif kind == "random":
        scores = torch.rand((batch, heads, nk), device=query.device, generator=generator)
        rank = torch.where(forced, 2.0, scores).argsort(-1, descending=True).argsort(-1)
        keep = rank < max(budget, int(forced.sum()))
    else:
        raise ValueError(f"unknown baseline {kind!r}; one of {', '.join(BASELINES)}")
    return BlockSparsePlan.from_block_tables(keep[:, :, None, :], block_size)


def prefill_plan(kind: str, query: Tensor, key: Tensor, block_size: int, density: float,
                 generator: torch.Generator | None) -> BlockSparsePlan:
    """The baseline's plan for causal self-attention over the prompt, at about ``density`` of the visible
    blocks."""
    n = query.shape[-2]
    if kind == "streaming":
        return density_matched_streaming_plan(n, block_size, density, query.device)
    if kind == "oracle":
        visible, _ = causal_block_tables(n, n, block_size, True, query.device)
        budget = (visible.sum(-1) * density).round().clamp(min=1).to(torch.int64)
        return top_mass_plan(query, key, block_size, budget.expand(query.shape[0], query.shape[1], -1))
    if kind == "random":
        return random_plan(n, n, block_size, density, query.shape[1], device=query.device, generator=generator)
    raise ValueError(f"unknown baseline {kind!r}; one of {', '.join(BASELINES)}")


class BaselineAttention(AttentionCallMode):
    """Runs every attention call of ``model`` through ``dam_compile.sparse_attention`` with the ``kind``
    baseline's plan: ``density`` of the visible blocks in the prefill, ``decode_density`` in decode steps.
    ``seed`` fixes the random baseline's draws."""

    def __init__(self, model: torch.nn.Module, kind: str, density: float, decode_density: float, block_size: int,
                 seed: int = 0, kernel: str = "auto") -> None:
        super().__init__(model)
        if kind not in BASELINES:
            raise ValueError(f"unknown baseline {kind!r}; one of {', '.join(BASELINES)}")
        self.kind, self.density, self.decode_density, self.block_size = kind, density, decode_density, block_size
        self.seed, self.kernel = seed, kernel
        self.generator: torch.Generator | None = None

    def on_attention(self, name: str, a: dict[str, Any]) -> Tensor:
        q, k, v = a["query"], a["key"], a["value"]
        decode = call_kind(name, a) == "decode"
        if self.kind == "random" and self.generator is None:
            self.generator = torch.Generator(device=q.device).manual_seed(self.seed)
        if decode:
            plan = decode_plan(self.kind, q, k, self.block_size, self.decode_density, a["scale"], self.generator)
        else:
            plan = prefill_plan(self.kind, q, k, self.block_size, self.density, self.generator)
        return self.attend(q, k, v, plan, scale=a["scale"], is_causal=not decode, enable_gqa=k.shape[1] != q.shape[1])

    def attend(self, q: Tensor, k: Tensor, v: Tensor, plan: BlockSparsePlan, **options) -> Tensor:
        """Run one call's plan: our op (a subclass may run the op's decomposition instead)."""
        return dam_compile.sparse_attention(q, k, v, plan, kernel=self.kernel, **options)
