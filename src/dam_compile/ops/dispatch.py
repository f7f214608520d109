"""Run-time choice between the sparse and the dense path of ``dam::sparse_attention``.

The choice is made on every call from the actual tensors, so one compiled graph serves short and long prompts,
prefill and decode, without a recompile. Each distinct choice is logged once and counted. :func:`call_path` is
the one per-call policy built on it: the graph pass, the eager oracles, the reports and the context-parallel ring
ask it which path a module's call takes.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from typing import Literal, Protocol

import torch
from torch import Tensor

from dam_compile.kernels.common import interpreting
from dam_compile.kernels.constants import ALWAYS_DENSE
from .dense_layers import dense_layer_reason

log = logging.getLogger("dam_compile")

Path = Literal["dense", "triton", "reference"]
KERNELS = ("auto", "triton", "reference")
FUSED_DTYPES = (torch.float16, torch.bfloat16)

# Below these, the sparse path costs more than the dense attention it replaces (its plan's launches and sampled
# scores against the blocks it skips), so ``kernel="auto"`` runs dense SDPA with no plan. Measured on an H100
# (``benchmarks/bench_plan.py``, ``results/plan_h100.json``). Prefill: plan + our kernel lost to cuDNN at 6.9e10
# (8B shape at 4K: 0.80x) and 3.9e10 (SmolLM2 at 8K: 0.64x), won from 1.5e11 (SmolLM2 at 16K: 1.13x at density
# 0.5) and 2.7e11 (8B at 8K: 1.25x); below that the plan's eight launches (about 0.33 ms of host time) cost more
# than the attention. Decode: the dynamic decode plan takes about 0.6 ms of host time (its compiled definition,
# 21 launches), where a dense step over 512 MiB of K/V (8B shape, 128K) took 0.19 ms; a dense step reaches 0.6 ms
# near 1.6 GiB.
SPARSE_MIN_PREFILL_WORK = 1e11  # query rows x keys x query heads x head dim of the dense attention
SPARSE_MIN_DECODE_BYTES = 2 * 2**30  # bytes of K and V one dense decode step reads
CROSSOVER = "too little attention for a sparse plan to pay off (below the measured crossover)"

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


def choose_path(query: Tensor, key: Tensor, min_seq_len: int, kernel: str, *, key_len: int | None = None,
                crossover: bool = True) -> tuple[Path, str]:
    """Pick the path for a ``[B, H, Lq, E]`` query against ``[B, KVH, Lk, E]`` keys and say why.

    Attention over fewer than ``min_seq_len`` keys runs dense (prefill of a short prompt, a decode step on a
    short cache). ``kernel='auto'`` takes the fused Triton kernels (prefill, or one query row: decode) for
    float16/bfloat16 CUDA tensors and dense attention elsewhere, and also runs dense when the call is too small
    for a plan to pay off (:func:`below_crossover`; ``min_seq_len=0`` turns that off too: every call sparse);
    ``'triton'`` forces them (any float dtype; on
    the CPU only under ``TRITON_INTERPRET=1``, for tests); ``'reference'`` runs the PyTorch block-sparse
    reference on any device (slow: for tests and fidelity checks). ``key_len``: the keys the attention spans
    when ``key`` holds only some of them (a context-parallel shard); ``crossover=False`` leaves the crossover out.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    decode = query.shape[-2] == 1
    if min_seq_len >= ALWAYS_DENSE:
        return "dense", "the site's layer is kept dense (dense_layers)"
    if (key.shape[-2] if key_len is None else key_len) < min_seq_len:
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
    if crossover and min_seq_len > 0 and below_crossover(query, key):
        return "dense", f"{'decode step' if decode else 'prefill'}: {CROSSOVER}"
    return "triton", fused


class PathOptions(Protocol):
    """What the per-call policy reads: ``DAMConfig`` and ``MaskOptions`` both have it."""

    @property
    def min_seq_len(self) -> int: ...

    @property
    def kernel(self) -> str: ...

    @property
    def dense_layers(self) -> int: ...


# Who runs the call, and so which of the op's rules apply (see call_path).
Runner = Literal["op", "ring", "plan"]
PLANNED = "planned at any length and on any device (the caller runs the plan)"


def call_path(options: PathOptions, module_path: str, query: Tensor, key: Tensor, *, runner: Runner = "op",
              key_len: int | None = None) -> tuple[Path, str]:
    """The path one attention call of the module at ``module_path`` takes under ``options``, and why: dense in
    the model's first ``dense_layers`` layers at every length (the pass gives their op
    ``min_seq_len=ALWAYS_DENSE``), otherwise as ``runner`` decides:

    - ``"op"``: ``dam::sparse_attention``'s run-time rule (:func:`choose_path`): the backend, its eager oracle,
      the reports;
    - ``"ring"``: the context-parallel ring's: ``min_seq_len`` against ``key_len`` (the whole sequence; ``key``
      is one shard), and no crossover (its dense path is our kernel on every block, not cuDNN);
    - ``"plan"``: a caller that plans every call and runs it itself (measurements, the answer check): only the
      dense layers run dense; the others report ``"reference"``, what they compute.
    """
    kept = dense_layer_reason(module_path, options.dense_layers)
    if kept is not None:
        return "dense", kept
    if runner == "plan":
        return "reference", PLANNED
    return choose_path(query, key, options.min_seq_len, options.kernel, key_len=key_len,
                       crossover=runner == "op")


def below_crossover(query: Tensor, key: Tensor) -> bool:
    """Whether dense attention of ``query [B, H, Lq, E]`` against ``key [B, KVH, Lk, E]`` is cheaper than the
    sparse path could make it: a prefill below ``SPARSE_MIN_PREFILL_WORK`` (rows x keys x heads x head dim, per
    sequence), a decode step reading fewer than ``SPARSE_MIN_DECODE_BYTES`` of K and V."""
    heads, q_len, dim = query.shape[1:]
    kv_heads, kv_len = key.shape[1:3]
    if q_len == 1:
        return 2 * kv_len * kv_heads * dim * key.element_size() < SPARSE_MIN_DECODE_BYTES
    return q_len * kv_len * heads * dim < SPARSE_MIN_PREFILL_WORK


def record(path: str, reason: str, key_len: int, min_seq_len: int) -> None:
    """Count a run-time choice; log it the first time it is seen. A dense run at or above ``min_seq_len`` (CPU
    tensors, float32, a kernel this device lacks) is warned about once per reason."""
    key = (path, reason)
    _counts[key] += 1
    if key not in _logged:
        _logged.add(key)
        log.info("dam: sparse_attention runs %s: %s", path, reason)
    if path == "dense" and key_len >= min_seq_len and not reason.endswith(CROSSOVER):  # that one is faster
        warn_dense_once(f"attention over {key_len} keys (min_seq_len={min_seq_len})", [reason])


def runtime_stats() -> dict[str, int]:
    """How often each path ran since the last reset, keyed ``"<path>: <reason>"``. Calls replayed inside a
    CUDA graph are not counted (no Python runs then)."""
    return {f"{path}: {reason}": n for (path, reason), n in _counts.items()}


def reset_runtime_stats() -> None:
    """Forget the counts, and which dense runs were warned about."""
    _counts.clear()
    _warned.clear()
