"""The per-call policy (``ops/dispatch.call_path``): the first ``dense_layers`` layers run dense whoever runs the
call; otherwise the op's run-time rule (``choose_path``), the ring's (whole-sequence length), or none at all for
callers that plan every call themselves. (The crossover's part: ``test_crossover.py``.)"""

import pytest
import torch

from dam_compile.config import DAMConfig
from dam_compile.ops.dispatch import PLANNED, call_path, choose_path

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
