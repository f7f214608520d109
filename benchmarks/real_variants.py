"""The real-model bench's variants: what runs each attention call of the model, eagerly, through our op.

- ``full``: the model as loaded (eager SDPA): the reference every other variant is scored against;
- ``dense-op``: every call through ``dam_compile.sparse_attention`` with the plan that keeps every block: the
  kernel's own bf16 noise, the floor of any sparse variant's agreement;
- ``dam-default`` and the other ``dam-*`` variants: :class:`PlanAttention` with a ``DAMConfig``: each call gets
  the plan that the ``dam`` backend's graph computes for it (:func:`dam_compile.reference_mode.plan_for`, the
  same ops), then our op runs it (the Triton kernel on CUDA). Decode steps get the decode plan;
- ``streaming``, ``oracle``: :class:`Baseline` (``fidelity_variants.BaselineAttention``) at the density the
  default measured.

On the CPU (no fused kernel) each sparse call runs the op's own decomposition, SDPA with the plan as a token mask
(``kernels/decompositions.py``: what the op computes, several times faster there than the chunked reference).

Every sparse call records its plan's density per head and, when asked, the exact attention mass the plan
keeps per head over every query row (``dam_compile.metrics.attention_mass_recall``): where fidelity is lost.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

import dam_compile
from dam_compile.config import DAMConfig
from dam_compile.ops.decompositions import sparse_attention_as_masked_sdpa
from dam_compile.plan.block_plan import BlockSparsePlan
from dam_compile.plan.reference import density_per_head
from dam_compile.metrics import attention_mass_recall
from dam_compile.module_stack import AttentionCallMode
from dam_compile.ops.dispatch import call_path
from dam_compile.reference_mode import plan_for
from fidelity_variants import BaselineAttention, call_kind

# name -> DAMConfig options beside min_seq_len=0 (every length runs its plan: at 4K the default's min_seq_len
# would keep it dense) and the kernel. The mass targets trace the default's density-vs-fidelity curve.
MASS_TARGETS = (0.9, 0.95, 0.98, 0.995)
DAM_VARIANTS: dict[str, dict[str, Any]] = {
    "dense-op": {"mask_source": "dense", "dense_layers": 0},
    "dam-default": {},
    **{f"dam-mass-{t}": {"mass_target": t} for t in MASS_TARGETS},
    "dam-adaptive": {"estimator": "adaptive", "density": 0.075, "mass_target": 0.95},  # the replaced default
    "dam-pooled": {"estimator": "pooled", "density": 0.075, "mass_target": 0.95},
    "dam-calibrated": {},  # a profile from dam_compile.calibrate (the paper's method), set by the bench
}
BASELINES = ("streaming", "oracle")
VARIANTS = ("full", *DAM_VARIANTS, *BASELINES)


def dam_config(name: str, kernel: str, profile=None, block_size: int | None = None) -> DAMConfig:
    """The options of a ``dam-*`` / ``dense-op`` variant (``block_size``: the default's unless given)."""
    options = dict(DAM_VARIANTS[name], min_seq_len=0, kernel=kernel)
    if block_size is not None:
        options.update(block_size=block_size)
    if name == "dam-calibrated":
        if profile is None:
            raise ValueError("dam-calibrated needs a profile")
        options.update(profile=profile)
    return DAMConfig.from_options(options)


@dataclass
class LayerRecord:
    """Per attention module: density per head of every prefill call (and mass recall per head when measured)."""

    density: list[Tensor] = field(default_factory=list)
    recall: list[Tensor] = field(default_factory=list)


class PlanAttention(AttentionCallMode):
    """Every SDPA call of ``model`` as the ``dam`` backend's rewritten graph runs it under ``config``: the
    call's plan (dynamic, dense, streaming or calibrated source; the first ``dense_layers`` layers dense), then
    :func:`attend`. A prefill call given HF's explicit causal mask runs as ``is_causal=True`` (what the pass's
    causal-mask reading does). ``measure_recall``: also the exact mass each plan keeps."""

    def __init__(self, model: torch.nn.Module, config: DAMConfig, measure_recall: bool = False) -> None:
        super().__init__(model)
        self.config, self.measure_recall = config, measure_recall
        self.layers: dict[str, LayerRecord] = defaultdict(LayerRecord)
        self.densities: dict[str, list[float]] = {"prefill": [], "decode": []}  # per call; a dense layer's: 1.0

    def prefill_density(self) -> float:
        """Mean block density of the prefill calls so far (those of the dense first layers count 1.0)."""
        return sum(self.densities["prefill"]) / max(1, len(self.densities["prefill"]))

    def decode_density(self) -> float:
        """Mean share of its key blocks a decode step kept (dense layers count 1.0)."""
        return sum(self.densities["decode"]) / max(1, len(self.densities["decode"]))

    def on_attention(self, name: str, a: dict[str, Any]) -> Tensor | None:
        q, k, v = a["query"], a["key"], a["value"]
        decode = call_kind(name, a) == "decode"
        kind = "decode" if decode else "prefill"
        if call_path(self.config, name, q, k, runner="plan")[0] == "dense":
            self.densities[kind].append(1.0)
            return None
        is_causal = not decode
        plan = plan_for(self.config, q, k, is_causal, a["scale"], module=name)
        enable_gqa = k.shape[1] != q.shape[1]
        density = density_per_head(plan, q.shape[-2], k.shape[-2], is_causal).float().cpu()
        self.densities[kind].append(float(density.mean()))
        if not decode:
            record = self.layers[name]
            record.density.append(density)
            if self.measure_recall:
                record.recall.append(attention_mass_recall(q, k, plan, is_causal=True, scale=a["scale"],
                                                           enable_gqa=enable_gqa).float().cpu())
        return attend(q, k, v, plan, self.config.kernel, scale=a["scale"], is_causal=is_causal, enable_gqa=enable_gqa)

    def per_layer(self) -> list[dict]:
        """Per attention module, in model order: mean density and mass recall per head over the recorded
        prefill calls (recall ``None`` unless measured)."""
        rows = []
        for name, record in self.layers.items():
            if not record.density:
                continue
            density = torch.stack(record.density).mean(0)[0]
            recall = torch.stack(record.recall).mean(0)[0] if record.recall else None
            rows.append({"module": name, "density": round(float(density.mean()), 4),
                         "density_per_head": [round(x, 4) for x in density.tolist()],
                         "recall": None if recall is None else round(float(recall.mean()), 5),
                         "recall_per_head": None if recall is None else [round(x, 5) for x in recall.tolist()]})
        return rows


def attend(q: Tensor, k: Tensor, v: Tensor, plan: BlockSparsePlan, kernel: str, **options) -> Tensor:
    """One call through our op on CUDA; on the CPU through its decomposition (the same values)."""
    if q.is_cuda:
        return dam_compile.sparse_attention(q, k, v, plan, kernel=kernel, **options)
    return sparse_attention_as_masked_sdpa(q, k, v, *plan.as_op_args(), None, options["scale"], options["is_causal"],
                                           options["enable_gqa"], plan.block_size, 0, kernel)


class Baseline(BaselineAttention):
    """``fidelity_variants.BaselineAttention`` whose calls run as :func:`attend` runs them."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, plan: BlockSparsePlan, **options) -> Tensor:
        return attend(q, k, v, plan, self.kernel, **options)
