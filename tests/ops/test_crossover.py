"""The measured crossover (``kernels/dispatch.py``): ``kernel="auto"`` runs dense SDPA, with no plan, where the
sparse path cannot pay for its plan; the choice is logged as every run-time choice is, without the loud warning
that a dense run a user did not expect gets."""

import warnings

import pytest
import torch

from dam_compile.ops import dispatch
from dam_compile.ops.dispatch import (
    CROSSOVER,
    SPARSE_MIN_DECODE_BYTES,
    SPARSE_MIN_PREFILL_WORK,
    DenseAttentionWarning,
    below_crossover,
    choose_path,
    record,
)


class _OnCuda(torch.Tensor):
    """A CPU tensor that says it lives on CUDA: the path choice reads only its shape, dtype and device."""

    @property
    def is_cuda(self) -> bool:
        return True


def qk(heads: int, kv_heads: int, q_len: int, kv_len: int, dim: int, dtype=torch.bfloat16):
    """Zero-stride tensors of the right shapes (no memory): the choice never reads values."""
    q = torch.zeros(1, dtype=dtype).expand(1, heads, q_len, dim)
    k = torch.zeros(1, dtype=dtype).expand(1, kv_heads, kv_len, dim)
    return q.as_subclass(_OnCuda), k.as_subclass(_OnCuda)


@pytest.mark.parametrize("heads, kv_heads, dim, dense_below, sparse_from", [
    (9, 3, 64, 8192, 16384),  # SmolLM2-135M: 8K runs dense, 16K sparse
    (32, 8, 128, 4096, 8192),  # Llama-3.1-8B
])
def test_prefill_crossover_by_work(heads, kv_heads, dim, dense_below, sparse_from):
    q, k = qk(heads, kv_heads, dense_below, dense_below, dim)
    assert below_crossover(q, k)
    assert choose_path(q, k, 1024, "auto") == ("dense", f"prefill: {CROSSOVER}")
    q, k = qk(heads, kv_heads, sparse_from, sparse_from, dim)
    assert not below_crossover(q, k)
    assert choose_path(q, k, 1024, "auto")[0] == "triton"


def test_decode_crossover_by_kv_bytes():
    """A decode step is memory-bound: what counts is the K/V it would read dense (8B shape: 128K dense, where the
    decode plan's host time is three dense steps; 1M sparse)."""
    for kv_len, dense in ((131072, True), (1048576, False)):
        q, k = qk(32, 8, 1, kv_len, 128)
        assert below_crossover(q, k) == dense
        assert (2 * kv_len * 8 * 128 * 2 < SPARSE_MIN_DECODE_BYTES) == dense
        assert choose_path(q, k, 1024, "auto")[0] == ("dense" if dense else "triton")


def test_explicit_choices_bypass_the_crossover():
    """``min_seq_len=0`` (every call sparse: tests, ring steps) and ``kernel="triton"`` keep the sparse path."""
    q, k = qk(9, 3, 2048, 2048, 64)
    assert q.shape[-2] * k.shape[-2] * 9 * 64 < SPARSE_MIN_PREFILL_WORK
    assert choose_path(q, k, 0, "auto")[0] == "triton"
    assert choose_path(q, k, 1024, "triton")[0] == "triton"
    assert choose_path(q, k, 4096, "auto")[1].startswith("sequence shorter than min_seq_len")


def test_the_ring_runs_sparse_below_the_crossover():
    """The context-parallel ring's dense path is our kernel on every block, not cuDNN: no crossover there, and
    ``min_seq_len`` counts the whole sequence's keys, not the shard's."""
    from types import SimpleNamespace

    from dam_compile.ops.dispatch import call_path

    options = SimpleNamespace(min_seq_len=1024, kernel="auto", dense_layers=0)
    q, k = qk(9, 3, 2048, 2048, 64)
    assert call_path(options, "model.layers.3.self_attn", q, k) == ("dense", f"prefill: {CROSSOVER}")
    assert call_path(options, "model.layers.3.self_attn", q, k, runner="ring", key_len=8192)[0] == "triton"
    short = call_path(options, "model.layers.3.self_attn", q, k, runner="ring", key_len=512)
    assert short == ("dense", "sequence shorter than min_seq_len=1024")


def test_crossover_is_logged_not_warned(caplog, monkeypatch):
    for name in ("_logged", "_warned"):
        monkeypatch.setattr(dispatch, name, set())
    monkeypatch.setattr(dispatch, "_counts", dispatch.Counter())
    with warnings.catch_warnings():
        warnings.simplefilter("error", DenseAttentionWarning)
        with caplog.at_level("INFO", logger="dam_compile"):
            record("dense", f"prefill: {CROSSOVER}", 8192, 1024)
    assert CROSSOVER in caplog.text
    with pytest.warns(DenseAttentionWarning):
        record("dense", "float32 inputs: the fused kernel runs float16 and bfloat16", 8192, 1024)
