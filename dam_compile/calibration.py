"""DAM Stage 1: capture a model's mean attention per (module, head) at the pattern capture length, derive
the patterns.

``calibrate(model, samples)`` runs the frozen model eagerly on each sample truncated to PCL tokens. Every
``scaled_dot_product_attention`` call is intercepted, its probabilities recomputed (``[B, H, P, P]`` at most:
never more than PCL x PCL per head) and summed per cell, with a per-cell count of valid (non-padding, visible)
positions; ``A_bar = sum / (count + 1e-10)``. Padded sequences (left or right) are realigned so that cell
``(i, j)`` always means "i-th and j-th real token".
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor

from .module_stack import AttentionCallMode
from .profile import DAMProfile, model_fingerprint

_COUNT_EPS = 1e-10


class AttentionCapture(AttentionCallMode):
    """Accumulates the attention probabilities of every SDPA call, keyed by the innermost module running it."""

    def __init__(self, model: torch.nn.Module, pcl: int) -> None:
        super().__init__(model)
        self.pcl = pcl
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, Tensor] = {}
        self.causal: dict[str, bool] = {}
        self.token_valid: Tensor | None = None  # [B, L] of the running sample

    def on_attention(self, name: str, a: dict[str, Any]) -> None:
        query, key = a["query"], a["key"]
        batch, heads, q_len, _ = query.shape
        kv_len = key.shape[-2]
        if q_len != kv_len:
            raise ValueError(f"calibration expects self-attention over the prompt; {name or 'a module'} ran "
                             f"{q_len} queries against {kv_len} keys (call calibrate without a KV cache)")
        probs, allowed = _probabilities(query, key, a)
        causal = bool((allowed & ~torch.ones_like(allowed[0, 0]).tril().bool()).sum() == 0)
        self.causal[name] = self.causal.get(name, True) and causal
        total = self.sums.setdefault(name, query.new_zeros((heads, self.pcl, self.pcl), dtype=torch.float64))
        count = self.counts.setdefault(name, query.new_zeros((heads, self.pcl, self.pcl), dtype=torch.float64))
        valid_tokens = self.token_valid if self.token_valid is not None else query.new_ones((batch, q_len), dtype=torch.bool)
        for b in range(batch):
            real = valid_tokens[b].nonzero().flatten()[: self.pcl]
            n = real.numel()
            cell_probs = probs[b][:, real][:, :, real]
            cell_valid = allowed[min(b, allowed.shape[0] - 1)][:, real][:, :, real].expand(heads, n, n)
            total[:, :n, :n] += torch.where(cell_valid, cell_probs, 0.0).to(torch.float64)
            count[:, :n, :n] += cell_valid.to(torch.float64)

    def mean_attention(self) -> dict[str, Tensor]:
        """``A_bar`` per module: float32 ``[H, P, P]``."""
        return {n: (self.sums[n] / (self.counts[n] + _COUNT_EPS)).float().cpu() for n in self.sums}


def _probabilities(query: Tensor, key: Tensor, a: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """Softmax probabilities ``[B, H, L, L]`` (float32) of one SDPA call and the cells it lets attend."""
    heads, kv_heads, length = query.shape[1], key.shape[1], query.shape[-2]
    if kv_heads != heads:
        key = key.repeat_interleave(heads // kv_heads, dim=1)
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(query.shape[-1])
    scores = torch.einsum("bhid,bhjd->bhij", query.float(), key.float()) * scale
    allowed = torch.ones((1, 1, length, length), dtype=torch.bool, device=query.device)
    if a["is_causal"]:
        allowed = allowed.tril()
    mask = a["attn_mask"]
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = allowed & mask
        else:
            scores = scores + mask.float()
            allowed = allowed & (mask > torch.finfo(mask.dtype).min / 2)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return probs, allowed


def _truncate(sample: Any, pcl: int) -> tuple[tuple, dict]:
    """A sample as ``(args, kwargs)`` for the model, sequence dims cut to ``pcl`` tokens."""
    if isinstance(sample, Tensor):
        sample = sample[None] if sample.dim() == 1 else sample
        return (sample[:, :pcl],), {}
    if isinstance(sample, dict):
        return (), {k: v[:, :pcl] if isinstance(v, Tensor) and v.dim() >= 2 else v for k, v in sample.items()}
    if isinstance(sample, (tuple, list)):
        return tuple(t[:, :pcl] if isinstance(t, Tensor) and t.dim() >= 2 else t for t in sample), {}
    raise ValueError(
        f"samples must yield token-id tensors [L] or [B, L], dicts of model inputs, or tuples of model "
        f"arguments; got {type(sample).__name__}"
    )


def calibrate(
    model: torch.nn.Module,
    samples: Iterable[Any],
    pcl: int = 128,
    box_cox_lambda: float = 0.5,
    tau: float = 0.3,
    mu: float = 0.8,
    *,
    progress: bool = True,
) -> DAMProfile:
    """Calibrate DAM patterns for ``model`` (the paper's Stage 1).

    Args:
        model: the frozen model, run eagerly (its attention must call ``scaled_dot_product_attention``: for
            HuggingFace models the default ``attn_implementation="sdpa"``). Not modified.
        samples: iterable of token ids ``[L]`` / ``[B, L]``, dicts of model inputs (``input_ids``,
            ``attention_mask``, ...) or tuples of positional inputs; sequence dims are cut to ``pcl``.
        pcl: pattern capture length (the paper recommends 128).
        box_cox_lambda, tau, mu: DAM's Box-Cox lambda, mask threshold and pattern match ratio.
        progress: show a tqdm progress bar.

    Returns:
        A :class:`DAMProfile` keyed by attention-module qualified name (``model.layers.3.self_attn``).
    """
    if isinstance(pcl, bool) or not isinstance(pcl, int) or pcl < 2:
        raise ValueError(f"pcl must be an int >= 2, got {pcl!r}")
    if not 0.0 < mu <= 1.0:
        raise ValueError(f"mu must lie in (0, 1], got {mu!r}")
    from tqdm.auto import tqdm

    capture = AttentionCapture(model, pcl)
    seen = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), capture:
            for sample in tqdm(samples, desc="dam calibrate", unit="batch", disable=not progress):
                args, kwargs = _truncate(sample, pcl)
                mask = kwargs.get("attention_mask")
                capture.token_valid = mask.bool() if isinstance(mask, Tensor) else None
                model(*args, **kwargs)
                seen += 1
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("samples is empty: calibration needs at least one sample")
    if not capture.sums:
        raise ValueError(
            "no scaled_dot_product_attention call was seen: load the model with attn_implementation='sdpa' "
            "(HuggingFace) or make its attention call torch.nn.functional.scaled_dot_product_attention"
        )
    return DAMProfile.from_mean_attention(
        capture.mean_attention(), capture.causal, box_cox_lambda=box_cox_lambda, tau=tau, mu=mu,
        model_fingerprint=model_fingerprint(model), samples=seen,
    )
