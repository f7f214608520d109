"""The per-call policy (``ops/dispatch.call_path``): the first ``dense_layers`` layers run dense whoever runs the
call; otherwise the op's run-time rule (``choose_path``), the ring's (whole-sequence length), or none at all for
callers that plan every call themselves; and the measured crossover: ``kernel="auto"`` runs dense SDPA, with no
plan, where the sparse path cannot pay for its plan; the choice is logged as every run-time choice is, without
the loud warning that a dense run a user did not expect gets."""

import warnings
from types import SimpleNamespace

import pytest
import torch

from dam_compile.config import DAMConfig
from dam_compile.ops import dispatch
from dam_compile.ops.dispatch import (
    CROSSOVER,
    PLANNED,
    SPARSE_MIN_DECODE_BYTES,
    SPARSE_MIN_PREFILL_WORK,
    DenseAttentionWarning,
    below_crossover,
    call_path,
    choose_path,
    record,
)

FIRST, LATER = "model.layers.0.self_attn", "model.layers.2.self_attn"


def qk(q_len: int, kv_len: int):
    return torch.randn(1, 4, q_len, 16), torch.randn(1, 2, kv_len, 16)


@pytest.mark.parametrize("runner", ["op", "ring", "plan"])
def test_a_dense_layer_is_dense_for_every_runner_and_names_its_layer(runner):
    config = DAMConfig(min_seq_len=0, kernel="reference", dense_layers=1)
    q, k = qk(64, 64)
    path, reason = call_path(config, FIRST, q, k, runner=runner, key_len=64)
    assert path == "dense" and "layer 0" in reason and "dense_layers=1" in reason
    assert call_path(config, LATER, q, k, runner=runner, key_len=64)[0] == "reference"


@pytest.mark.parametrize("options, kv_len, expected", [
    (dict(kernel="reference", min_seq_len=128), 64, ("dense", "sequence shorter than min_seq_len=128")),
    (dict(kernel="reference", min_seq_len=128), 128, ("reference", "kernel='reference'")),
    (dict(kernel="auto", min_seq_len=0), 64, ("dense", "CPU tensors: the fused sparse kernel needs CUDA "
                                                        "(kernel='reference' runs the PyTorch one)")),
])
def test_the_op_runner_is_the_ops_own_rule(options, kv_len, expected):
    """Outside the dense layers the policy is ``choose_path``: what ``dam::sparse_attention`` does at run time;
    ``DAMConfig`` and its ``MaskOptions`` give the same answer."""
    config = DAMConfig(dense_layers=1, **options)
    q, k = qk(32, kv_len)
    assert call_path(config, LATER, q, k) == expected
    assert call_path(config.mask_options(), LATER, q, k) == expected
    assert expected == choose_path(q, k, config.min_seq_len, config.kernel)


def test_the_ring_counts_the_whole_sequence_not_the_shard():
    config = DAMConfig(kernel="reference", min_seq_len=128, dense_layers=0)
    q, k = qk(64, 64)  # one rank's shard of a 256-token sequence
    assert call_path(config, LATER, q, k)[0] == "dense"
    assert call_path(config, LATER, q, k, runner="ring", key_len=256)[0] == "reference"
    assert call_path(config, LATER, q, k, runner="ring", key_len=96) == (
        "dense", "sequence shorter than min_seq_len=128")


def test_a_caller_that_plans_every_call_ignores_length_and_device():
    """The answer check, the measures and the benchmarks plan every call (the reference on the CPU): a short
    call on CPU tensors with ``kernel="auto"`` is dense for the op, planned for them."""
    config = DAMConfig(kernel="auto", min_seq_len=4096, dense_layers=1)
    q, k = qk(32, 32)
    assert call_path(config, LATER, q, k)[0] == "dense"
    assert call_path(config, LATER, q, k, runner="plan") == ("reference", PLANNED)


def test_choose_path_key_len_and_crossover_default_to_the_ops():
    q, k = qk(32, 64)
    assert choose_path(q, k, 128, "reference") == choose_path(q, k, 128, "reference", key_len=64)
    assert choose_path(q, k, 128, "reference", key_len=128)[0] == "reference"
    with pytest.raises(ValueError, match="kernel"):
        choose_path(q, k, 0, "fast")


class _OnCuda(torch.Tensor):
    """A CPU tensor that says it lives on CUDA: the path choice reads only its shape, dtype and device."""

    @property
    def is_cuda(self) -> bool:
        return True


def cuda_qk(heads: int, kv_heads: int, q_len: int, kv_len: int, dim: int, dtype=torch.bfloat16):
    """Zero-stride tensors of the right shapes (no memory): the choice never reads values."""
    q = torch.zeros(1, dtype=dtype).expand(1, heads, q_len, dim)
    k = torch.zeros(1, dtype=dtype).expand(1, kv_heads, kv_len, dim)
    return q.as_subclass(_OnCuda), k.as_subclass(_OnCuda)


@pytest.mark.parametrize("heads, kv_heads, dim, dense_below, sparse_from", [
    (9, 3, 64, 8192, 16384),  # SmolLM2-135M: 8K runs dense, 16K sparse
    (32, 8, 128, 4096, 8192),  # Llama-3.1-8B
])
def test_prefill_crossover_by_work(heads, kv_heads, dim, dense_below, sparse_from):
    q, k = cuda_qk(heads, kv_heads, dense_below, dense_below, dim)
    assert below_crossover(q, k)
    assert choose_path(q, k, 1024, "auto") == ("dense", f"prefill: {CROSSOVER}")
    q, k = cuda_qk(heads, kv_heads, sparse_from, sparse_from, dim)
    assert not below_crossover(q, k)
    assert choose_path(q, k, 1024, "auto")[0] == "triton"


def test_decode_crossover_by_kv_bytes():
    """A decode step is memory-bound: what counts is the K/V it would read dense (8B shape: 128K dense, where the
    decode plan's host time is three dense steps; 1M sparse)."""
    for kv_len, dense in ((131072, True), (1048576, False)):
        q, k = cuda_qk(32, 8, 1, kv_len, 128)
        assert below_crossover(q, k) == dense
        assert (2 * kv_len * 8 * 128 * 2 < SPARSE_MIN_DECODE_BYTES) == dense
        assert choose_path(q, k, 1024, "auto")[0] == ("dense" if dense else "triton")


def test_explicit_choices_bypass_the_crossover():
    """``min_seq_len=0`` (every call sparse: tests, ring steps) and ``kernel="triton"`` keep the sparse path."""
    q, k = cuda_qk(9, 3, 2048, 2048, 64)
    assert q.shape[-2] * k.shape[-2] * 9 * 64 < SPARSE_MIN_PREFILL_WORK
    assert choose_path(q, k, 0, "auto")[0] == "triton"
    assert choose_path(q, k, 1024, "triton")[0] == "triton"
    assert choose_path(q, k, 4096, "auto")[1].startswith("sequence shorter than min_seq_len")


def test_the_ring_runs_sparse_below_the_crossover():
    """The context-parallel ring's dense path is our kernel on every block, not cuDNN: no crossover there, and
    ``min_seq_len`` counts the whole sequence's keys, not the shard's."""
    options = SimpleNamespace(min_seq_len=1024, kernel="auto", dense_layers=0)
    q, k = cuda_qk(9, 3, 2048, 2048, 64)
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
