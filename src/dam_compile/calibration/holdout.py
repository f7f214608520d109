"""Which heads a fixed DAM pattern cannot serve: the calibrated profile checked on held-out samples.

The paper's calibrated patterns are fixed per head (diagonals, columns, the PCL corner) and extended to any
length. Heads that look something up (a needle, a key, a variable: DuoAttention's *retrieval heads*) have no
fixed place to look, so their extended pattern keeps little of their real attention once inputs are longer
than PCL. Here each head's **held-out recall** is measured: the share of its true attention probabilities
(softmax of the call's own scores, mask and scale) that falls inside its extended mask, token-exact, averaged
over the held-out query rows. ``calibrate`` marks heads whose recall is below ``min_recall`` dynamic.

Probabilities are computed in query-row chunks (:func:`dam_compile.metrics.attention_mass_recall`), so 4K-8K
token held-out samples fit on a CPU.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from dam_compile.plan.pattern_plan import pattern_plan
from dam_compile.metrics import attention_mass_recall
from dam_compile.module_stack import AttentionCallMode
from .profile import DAMProfile

RECALL_BLOCK = 128  # any block size is exact: the pattern plan's token pattern cuts its partial blocks


def split_holdout(samples: list, holdout: float | Iterable[Any]) -> tuple[list, list]:
    """``(capture, held_out)``. A float holds out that share of ``samples`` (the last ones; at least one, and
    at least one left to capture); with a single sample it serves both (the capture sees only its first PCL
    tokens). Any other iterable is the held-out set, and every sample is captured."""
    if not isinstance(holdout, float):
        return samples, list(holdout)
    if len(samples) < 2:
        return samples, samples
    count = min(len(samples) - 1, max(1, round(holdout * len(samples))))
    return samples[:-count], samples[-count:]


class HoldoutRecall(AttentionCallMode):
    """Accumulates, per profiled module, each head's kept attention mass over held-out query rows."""

    def __init__(self, model: torch.nn.Module, profile: DAMProfile) -> None:
        super().__init__(model)
        self.profile = profile
        self.kept: dict[str, Tensor] = {}  # float64 [H]: sum over rows of the kept share
        self.rows: dict[str, float] = {}

    def on_attention(self, name: str, a: dict[str, Any]) -> None:
        module = self.profile.modules.get(name)
        if module is None:
            return None
        query, key = a["query"], a["key"]
        batch, heads, length, _ = query.shape
        if key.shape[-2] != length:
            raise ValueError(f"the held-out check expects self-attention over the prompt; {name} ran {length} "
                             f"queries against {key.shape[-2]} keys (pass samples without a KV cache)")
        p = self.profile.patterns_on(name, query.device)
        plan = pattern_plan(p.diagonals, p.columns, p.corner, length, length, RECALL_BLOCK, module.is_causal)
        recall = attention_mass_recall(
            query, key, plan, is_causal=bool(a["is_causal"]), scale=a["scale"],
            enable_gqa=key.shape[1] != heads, attn_mask=a["attn_mask"],
        )  # [B, H], each a mean over that sequence's rows
        total = self.kept.setdefault(name, torch.zeros(heads, dtype=torch.float64))
        total += recall.sum(0).cpu() * length
        self.rows[name] = self.rows.get(name, 0.0) + batch * length
        return None

    def recall(self) -> dict[str, Tensor]:
        """float32 ``[H]`` per module seen: mean recall over held-out rows."""
        return {n: (kept / self.rows[n]).float() for n, kept in self.kept.items()}


def dynamic_split(recall: dict[str, Tensor], min_recall: float) -> dict[str, Tensor]:
    """bool ``[H]`` per module: heads whose held-out recall is below ``min_recall``."""
    return {name: r < min_recall for name, r in recall.items()}
