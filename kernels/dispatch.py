"""Run-time choice between the sparse and the dense path of ``dam::sparse_attention``.

The choice is made on every call from the actual tensors, so one compiled graph serves short and long prompts,
prefill and decode, without a recompile. Each distinct choice is logged once and counted.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from typing import Literal

import torch
from torch import Tensor

from .launch_common import interpreting
from .constants import ALWAYS_DENSE

log = logging.getLogger("dam_compile")

Path = Literal["dense", "triton", "reference"]
KERNELS = ("auto", "triton", "reference")
FUSED_DTYPES = (torch.float16, torch.bfloat16)

_counts: Counter[tuple[str, str]] = Counter()
_logged: set[tuple[str, str]] = set()
_warned: set[str] = set()


class DenseAttentionWarning(UserWarning):
    """Attention that the ``dam`` backend was asked to speed up runs dense at a length where it would be sparse."""


def warn_dense_once(what: str, reasons: list[str]) -> None:
    """One loud warning (and a log line) per distinct ``reasons``: ``what`` ran dense, and why."""
    distinct = sorted(set(reasons))
    key = " | ".join(distinct)
    if key in _warned:
        return
    _warned.add(key)
    message = f"dam: {what} runs dense, with no speedup: " + "; ".join(distinct)
    log.warning(message)
    warnings.warn(message, DenseAttentionWarning, stacklevel=3)


def choose_path(query: Tensor, key: Tensor, min_seq_len: int, kernel: str) -> tuple[Path, str]:
    """Pick the path for a ``[B, H, Lq, E]`` query against ``[B, KVH, Lk, E]`` keys and say why.

    Attention over fewer than ``min_seq_len`` keys runs dense (prefill of a short prompt, a decode step on a
    short cache). ``kernel='auto'`` takes the fused Triton kernels (prefill, or one query row: decode) for
    float16/bfloat16 CUDA tensors and dense attention elsewhere; ``'triton'`` forces them (any float dtype; on
    the CPU only under ``TRITON_INTERPRET=1``, for tests); ``'reference'`` runs the PyTorch block-sparse
    reference on any device (slow: for tests and fidelity checks).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    decode = query.shape[-2] == 1
    if min_seq_len >= ALWAYS_DENSE:
        return "dense", "the site's layer is kept dense (dense_layers)"
    if key.shape[-2] < min_seq_len:
        what = "decode step: KV cache" if decode else "sequence"
        return "dense", f"{what} shorter than min_seq_len={min_seq_len}"
    if kernel == "reference":
        return "reference", "kernel='reference'"
    fused = "fused block-sparse decode kernel" if decode else "fused block-sparse Triton kernel"
    if kernel == "triton":
        if query.is_cuda or interpreting():
            return "triton", f"kernel='triton' ({fused})"
        return "dense", "kernel='triton' on CPU tensors needs TRITON_INTERPRET=1"
    if not query.is_cuda:
        return "dense", "CPU tensors: the fused sparse kernel needs CUDA (kernel='reference' runs the PyTorch one)"
    if query.dtype not in FUSED_DTYPES:
        return "dense", f"{query.dtype} inputs: the fused kernel runs float16 and bfloat16"
    return "triton", fused


def record(path: str, reason: str, key_len: int, min_seq_len: int) -> None:
    """Count a run-time choice; log it the first time it is seen. A dense run at or above ``min_seq_len`` (CPU
    tensors, float32, a kernel this device lacks) is warned about once per reason."""
    key = (path, reason)
    _counts[key] += 1
    if key not in _logged:
        _logged.add(key)
        log.info("dam: sparse_attention runs %s: %s", path, reason)
    if path == "dense" and key_len >= min_seq_len:
        warn_dense_once(f"attention over {key_len} keys (min_seq_len={min_seq_len})", [reason])


def runtime_stats() -> dict[str, int]:
    """How often each path ran since the last reset, keyed ``"<path>: <reason>"``. Calls replayed inside a
    CUDA graph are not counted (no Python runs then)."""
    return {f"{path}: {reason}": n for (path, reason), n in _counts.items()}


def reset_runtime_stats() -> None:
    """Forget the counts, and which dense runs were warned about."""
    _counts.clear()
    _warned.clear()
