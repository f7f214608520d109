"""What each attention's mask does on real inputs: per (module, head), the density and the attention-mass
recall of the plan the backend builds for the call, and the path the op would take at run time.

Run eagerly (``with PlanMeasure(model, config): model(x)``); plans are built with the configured source even
where the op would run dense (a short input, a CPU tensor), so the masks can be seen at any length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from dam_compile.config import DAMConfig
from dam_compile.ops.dispatch import call_path
from dam_compile.plan.reference import density_per_head
from dam_compile.plan.structured_plans import dense_plan
from dam_compile.metrics import attention_mass_recall
from dam_compile.module_stack import AttentionCallMode
from dam_compile.reference_mode import plan_for


@dataclass
class SiteMeasure:
    """One attention module's last measured call. ``density``/``recall``: per query head (batch mean);
    ``recall`` is ``None`` when the call had an explicit mask (recall is defined against causal attention);
    ``blocks``: ``[H, Mq, Nk]`` int8 of batch 0 (0 dropped, 1 partial, 2 full) for heatmaps."""

    module_path: str
    q_len: int
    kv_len: int
    density: list[float]
    recall: list[float] | None
    path: str
    path_reason: str
    blocks: Tensor = field(repr=False)


class PlanMeasure(AttentionCallMode):
    def __init__(self, model: torch.nn.Module, config: DAMConfig, progress: Any = None) -> None:
        super().__init__(model)
        self.config = config
        self.progress = progress  # a tqdm bar advanced once per measured call, or None
        # Build the plan even where the op would not: min_seq_len 0, the reference path on any device.
        self._planning = config.replace({"min_seq_len": 0, "kernel": "reference"})
        self.sites: dict[str, SiteMeasure] = {}

    def on_attention(self, name: str, a: dict[str, Any]) -> None:
        query, key = a["query"], a["key"]
        if query.shape[-2] == 1 or a["dropout_p"] or query.dim() != 4:
            return None  # decode steps and training calls are not measured
        is_causal, mask = bool(a["is_causal"]), a["attn_mask"]
        if call_path(self._planning, name, query, key, runner="plan")[0] == "dense":  # a dense layer: every block
            plan = dense_plan(query.shape[-2], key.shape[-2], self.config.block_size, is_causal, query.device)
        else:
            plan = plan_for(self._planning, query, key, is_causal, a["scale"], mask, module=name)
        q_len, kv_len = query.shape[-2], key.shape[-2]
        gqa = key.shape[1] != query.shape[1]
        density = density_per_head(plan, q_len, kv_len, is_causal).mean(0)
        recall = None
        if mask is None:
            recall = attention_mass_recall(query, key, plan, is_causal=is_causal, scale=a["scale"],
                                           enable_gqa=gqa).mean(0).tolist()
        path, reason = call_path(self.config, name, query, key)
        partial, full = plan.block_tables(kv_len)
        blocks = (partial[0].to(torch.int8) + 2 * full[0].to(torch.int8)).cpu()
        heads = query.shape[1]
        self.sites[name] = SiteMeasure(
            name, q_len, kv_len, density.expand(heads).tolist(), recall, path, reason, blocks.expand(heads, -1, -1),
        )
        if self.progress is not None:
            self.progress.update(1)
        return None
