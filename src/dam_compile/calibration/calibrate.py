"""DAM Stage 1: capture a model's mean attention per (module, head) at the pattern capture length, derive
the patterns; then mark the heads whose patterns fail on held-out samples dynamic (:mod:`.holdout`).

``calibrate(model, samples)`` runs the frozen model eagerly on each sample truncated to PCL tokens. Every
``scaled_dot_product_attention`` call is intercepted, its probabilities recomputed (``[B, H, P, P]`` at most:
never more than PCL x PCL per head) and summed per cell, with a per-cell count of valid (non-padding, visible)
positions; ``A_bar = sum / (count + 1e-10)``. Padded sequences (left or right) are realigned so that cell
``(i, j)`` always means "i-th and j-th real token".
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from .holdout import HoldoutRecall, dynamic_split, split_holdout
from dam_compile.module_stack import AttentionCallMode
from dam_compile.plan.arith import softmax_scale
from dam_compile.plan.defaults import DEFAULT_BOX_COX_LAMBDA, DEFAULT_MU, DEFAULT_PCL, DEFAULT_TAU
from .profile import DAMProfile, model_fingerprint

_COUNT_EPS = 1e-10
DEFAULT_HOLDOUT = 0.25
DEFAULT_HOLDOUT_LEN = 4096
DEFAULT_MIN_RECALL = 0.5


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

    def begin_sample(self, kwargs: dict[str, Any]) -> None:
        """Note which tokens of the next sample are real (its ``attention_mask``, when it has one)."""
        mask = kwargs.get("attention_mask")
        self.token_valid = mask.bool() if isinstance(mask, Tensor) else None

    def mean_attention(self) -> dict[str, Tensor]:
        """``A_bar`` per module: float32 ``[H, P, P]``."""
        return {n: (self.sums[n] / (self.counts[n] + _COUNT_EPS)).float().cpu() for n in self.sums}


def _probabilities(query: Tensor, key: Tensor, a: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """Softmax probabilities ``[B, H, L, L]`` (float32) of one SDPA call and the cells it lets attend."""
    heads, kv_heads, length = query.shape[1], key.shape[1], query.shape[-2]
    if kv_heads != heads:
        key = key.repeat_interleave(heads // kv_heads, dim=1)
    scale = softmax_scale(a["scale"], query.shape[-1])
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


def _truncate(sample: Any, pcl: int | None) -> tuple[tuple, dict]:
    """A sample as ``(args, kwargs)`` for the model, sequence dims cut to ``pcl`` tokens (``None``: uncut)."""
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
    pcl: int = DEFAULT_PCL,
    box_cox_lambda: float = DEFAULT_BOX_COX_LAMBDA,
    tau: float = DEFAULT_TAU,
    mu: float = DEFAULT_MU,
    *,
    holdout: float | Iterable[Any] = DEFAULT_HOLDOUT,
    holdout_len: int | None = DEFAULT_HOLDOUT_LEN,
    min_recall: float | None = DEFAULT_MIN_RECALL,
    progress: bool = True,
) -> DAMProfile:
    """Calibrate DAM patterns for ``model`` (the paper's Stage 1), then find the heads no fixed pattern serves.

    Patterns are captured at ``pcl`` tokens. Each head's extended pattern is then checked on held-out samples
    run longer (up to ``holdout_len`` tokens, so the extension beyond PCL is what is tested): a head whose
    pattern keeps less than ``min_recall`` of its real attention mass there (a retrieval head, in
    DuoAttention's terms) is marked *dynamic*, and the ``dam`` backend runs it with the dynamic DAM plan while
    the other heads keep their calibrated patterns.

    Args:
        model: the frozen model, run eagerly (its attention must call ``scaled_dot_product_attention``: for
            HuggingFace models the default ``attn_implementation="sdpa"``). Not modified.
        samples: iterable of token ids ``[L]`` / ``[B, L]``, dicts of model inputs (``input_ids``,
            ``attention_mask``, ...) or tuples of positional inputs; cut to ``pcl`` tokens for the capture.
        pcl: pattern capture length (the paper recommends 128).
        box_cox_lambda, tau, mu: DAM's Box-Cox lambda, mask threshold and pattern match ratio.
        holdout: the held-out samples (any iterable, in the forms of ``samples``), or a float: that share of
            ``samples`` (the last ones) is held out of the capture. A single sample serves both.
        holdout_len: held-out samples are cut to this many tokens (``None``: their full length). The default
            4096 is 32x the default PCL: long enough that a pattern's extension, not its corner, decides.
        min_recall: heads whose held-out recall is below this become dynamic; ``None`` or 0 skips the check
            (the paper's method: every head calibrated). The default 0.5 marks heads that lose most of their
            attention outside their fixed pattern: heads with position-fixed attention (sinks, local windows,
            strides) keep far more as inputs grow, while a head looking up a token whose place moves keeps little
            (its mass sits on that token); a higher value also turns diffuse heads dynamic, which costs speed
            (a dynamic head keeps up to the backend's ``density`` of blocks) for little gain.
        progress: show tqdm progress bars.

    Returns:
        A :class:`DAMProfile` keyed by attention-module qualified name (``model.layers.3.self_attn``), with
        each module's dynamic heads and held-out recall.
    """
    if isinstance(pcl, bool) or not isinstance(pcl, int) or pcl < 2:
        raise ValueError(f"pcl must be an int >= 2, got {pcl!r}")
    if not 0.0 < mu <= 1.0:
        raise ValueError(f"mu must lie in (0, 1], got {mu!r}")
    _check_holdout_args(holdout, holdout_len, min_recall)
    samples = list(samples)
    if not samples:
        raise ValueError("samples is empty: calibration needs at least one sample")
    check = bool(min_recall)
    captured, held_out = split_holdout(samples, holdout) if check else (samples, [])
    if check and not held_out:
        raise ValueError("holdout is empty: the held-out check needs at least one sample (or min_recall=None)")

    capture = AttentionCapture(model, pcl)
    _run(model, captured, pcl, capture, "dam calibrate", progress, before=capture.begin_sample)
    if not capture.sums:
        raise ValueError(
            "no scaled_dot_product_attention call was seen: load the model with attn_implementation='sdpa' "
            "(HuggingFace) or make its attention call torch.nn.functional.scaled_dot_product_attention"
        )
    profile = DAMProfile.from_mean_attention(
        capture.mean_attention(), capture.causal, box_cox_lambda=box_cox_lambda, tau=tau, mu=mu,
        model_fingerprint=model_fingerprint(model), samples=len(captured),
    )
    if not check:
        return profile
    measure = HoldoutRecall(model, profile)
    _run(model, held_out, holdout_len, measure, "dam held-out check", progress)
    recall = measure.recall()
    return profile.with_dynamic_heads(
        dynamic_split(recall, min_recall), holdout_recall=recall, min_recall=float(min_recall),
        holdout_samples=len(held_out),
    )


def _check_holdout_args(holdout: Any, holdout_len: Any, min_recall: Any) -> None:
    if min_recall is not None and (isinstance(min_recall, bool) or not isinstance(min_recall, (int, float))
                                   or not 0.0 <= min_recall <= 1.0):
        raise ValueError(f"min_recall must be a number in [0, 1] or None, got {min_recall!r}")
    if isinstance(holdout, float):
        if not 0.0 < holdout < 1.0:
            raise ValueError(f"holdout as a share of the samples must lie in (0, 1), got {holdout!r}")
    elif isinstance(holdout, (str, bytes, Tensor, dict)) or not hasattr(holdout, "__iter__"):
        raise ValueError("holdout must be a share of the samples (a float) or an iterable of held-out samples, "
                         f"got {type(holdout).__name__}")
    if holdout_len is not None and (isinstance(holdout_len, bool) or not isinstance(holdout_len, int)
                                    or holdout_len < 2):
        raise ValueError(f"holdout_len must be an int >= 2 or None, got {holdout_len!r}")


def _run(model: torch.nn.Module, samples: list, length: int | None, mode: AttentionCallMode, desc: str,
         progress: bool, before: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Run ``model`` eagerly (eval, no grad) on each sample cut to ``length`` tokens inside ``mode``; ``before``
    sees each sample's keyword inputs first."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), mode:
            for sample in tqdm(samples, desc=desc, unit="batch", disable=not progress):
                args, kwargs = _truncate(sample, length)
                if before is not None:
                    before(kwargs)
                model(*args, **kwargs)
    finally:
        model.train(was_training)
