"""Would a calibrated profile keep the model's answers? Its next-token predictions against full attention's.

``dam-compile calibrate`` runs this on one held-out sample. The model runs once with full attention and once
with every attention call on the plan the ``dam`` backend would give it under the profile (the first
``dense_layers`` layers dense, as the backend keeps them). The check reports the mean KL(full || profile) per
token and the share of positions whose top-1 token is unchanged. On SmolLM2-135M (``benchmarks/bench_real.py``,
8K) the default dynamic mask gives a KL of 0.0055 and a top-1 agreement of 0.967; the calibrated profiles
measured there gave 0.043 (``min_recall=0.9``, 261 of 270 heads dynamic) to 5.4 (the paper's, every head
calibrated). The limits below sit between the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .config import DAMConfig
from .plan.reference import block_sparse_attention_reference
from .module_stack import AttentionCallMode
from .ops.dispatch import call_path
from .calibration.profile import DAMProfile
from .reference_mode import plan_for

MAX_KL = 0.02  # nats per token: about 4x the default dynamic mask's on a real model
MIN_TOP1 = 0.95


@dataclass(frozen=True)
class AnswerCheck:
    kl: float  # mean KL(full || profile) per position, nats
    top1: float  # share of positions whose top-1 token is full attention's
    positions: int

    @property
    def loses_answers(self) -> bool:
        return self.kl > MAX_KL or self.top1 < MIN_TOP1


class ProfileAttention(AttentionCallMode):
    """Every prefill attention call of ``model`` on its profile plan, through the PyTorch reference on any device
    (the op's fused kernels take a dense path on CPU tensors and float32: the check must see the profile's
    mask); calls of the first ``config.dense_layers`` layers and calls the profile has no entry for stay dense."""

    def __init__(self, model: torch.nn.Module, config: DAMConfig) -> None:
        super().__init__(model)
        self.config = config

    def on_attention(self, name: str, a: dict[str, Any]) -> Tensor | None:
        q, k = a["query"], a["key"]
        if q.shape[-2] == 1 or self.config.profile.find_module(name) is None:
            return None  # prefill calls of the profile's modules only
        if call_path(self.config, name, q, k, runner="plan")[0] == "dense":
            return None
        plan = plan_for(self.config, q, k, a["is_causal"], a["scale"], a["attn_mask"], module=name)
        return block_sparse_attention_reference(q, k, a["value"], plan, attn_mask=a["attn_mask"], scale=a["scale"],
                                                is_causal=a["is_causal"], enable_gqa=a["enable_gqa"])


@torch.no_grad()
def answer_check(model: torch.nn.Module, profile: DAMProfile, input_ids: Tensor,
                 dense_layers: int | None = None) -> AnswerCheck:
    """Next-token predictions over the second half of ``input_ids [1, L]`` with ``profile`` against full
    attention's (the model must return ``.logits`` ``[1, L, V]``; it is run eagerly, not modified)."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 4:
        raise ValueError(f"input_ids must be one sequence [1, L] of at least 4 tokens, got {tuple(input_ids.shape)}")
    # kernel="reference": the plan op then always plans (its dense signal, a plan that keeps nothing, is for
    # calls the op itself would run dense).
    options = {"profile": profile, "min_seq_len": 0, "kernel": "reference"}
    if dense_layers is not None:
        options["dense_layers"] = dense_layers
    config = DAMConfig.from_options(options)
    was_training = model.training
    model.eval()
    try:
        half = input_ids.shape[1] // 2
        full = model(input_ids).logits[0, half:].float().log_softmax(-1)
        with ProfileAttention(model, config):
            ours = model(input_ids).logits[0, half:].float().log_softmax(-1)
    finally:
        model.train(was_training)
    kl = float((full.exp() * (full - ours)).sum(-1).mean())
    top1 = float((full.argmax(-1) == ours.argmax(-1)).float().mean())
    return AnswerCheck(kl=kl, top1=top1, positions=full.shape[0])
