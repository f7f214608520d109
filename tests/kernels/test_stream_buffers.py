"""``StreamBuffers``: one buffer per (device, stream), reused while large enough, replaced by a larger one when not
(the old one kept alive: a captured CUDA graph replays its address), zero-filled when made if asked.

On a CPU the buffers are made on the CPU in place of CUDA (the module's ``torch.device("cuda", i)`` redirected);
the CUDA test makes real ones."""

from types import SimpleNamespace

import pytest
import torch

from dam_compile.kernels import stream_buffers
from dam_compile.kernels.stream_buffers import COUNTERS, StreamBuffers


@pytest.fixture
def on_cpu(monkeypatch):
    """The module's ``torch`` with ``device("cuda", i)`` made the CPU, and ``empty`` filled with a marker so an
    unzeroed buffer shows; records what it was asked for."""
    made = []

    def device(kind, index):
        made.append((kind, index))
        return torch.device("cpu")

    shim = SimpleNamespace(device=device, zeros=torch.zeros,
                           empty=lambda *a, **k: torch.empty(*a, **k).fill_(7))
    monkeypatch.setattr(stream_buffers, "torch", shim)
    return made


def test_one_buffer_per_device_and_stream_reused_while_large_enough(on_cpu):
    buffers = StreamBuffers(torch.int32, zeroed=True)
    first = buffers.get(0, 11, 64)
    assert first.dtype == torch.int32 and first.numel() == 64 and not first.any()
    assert on_cpu == [("cuda", 0)]
    assert buffers.get(0, 11, 10) is first and buffers.get(0, 11, 64) is first  # smaller or equal: the same
    other_stream, other_device = buffers.get(0, 12, 8), buffers.get(1, 11, 8)
    assert other_stream is not first and other_device is not first and other_stream is not other_device
    assert on_cpu == [("cuda", 0), ("cuda", 0), ("cuda", 1)]


def test_a_larger_request_replaces_the_buffer_and_keeps_the_old_one_alive(on_cpu):
    buffers = StreamBuffers(torch.int8, zeroed=False)
    small = buffers.get(0, 5, 16)
    assert (small == 7).all()  # not zeroed: as made
    large = buffers.get(0, 5, 17)
    assert large.numel() == 17 and large is not small
    assert buffers.get(0, 5, 17) is large
    assert any(old is small for old in buffers._replaced)  # a graph captured with it may still replay it


def test_the_shared_counters_are_zeroed_int32():
    assert COUNTERS.dtype == torch.int32 and COUNTERS.zeroed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_buffers_per_stream():
    buffers = StreamBuffers(torch.int32, zeroed=True)
    stream = torch.cuda.Stream()
    here = buffers.get(0, torch.cuda.current_stream().cuda_stream, 32)
    there = buffers.get(0, stream.cuda_stream, 32)
    assert here.is_cuda and there.is_cuda and here.data_ptr() != there.data_ptr()
    assert not here.any() and not there.any()
