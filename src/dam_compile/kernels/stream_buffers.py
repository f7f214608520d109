"""Device memory a kernel needs beyond its operands, kept per device and stream instead of allocated per call.

Launches on one stream never overlap, so one buffer per ``(device, stream)`` serves them all: Triton's global
scratch (the Hopper kernel's TMA descriptors, written and read within one launch) and counters that a kernel
leaves at zero when it ends (the persistent grid's work counter, the decode kernel's arrivals per KV head).
A buffer too small for a call is replaced by a larger one, and the old one is kept alive: a CUDA graph captured
with it replays its address.
"""

from __future__ import annotations

import torch
from torch import Tensor


class StreamBuffers:
    """Buffers of ``dtype``, one per ``(device index, raw stream handle)``, zero-filled when made if ``zeroed``."""

    def __init__(self, dtype: torch.dtype, zeroed: bool):
        self.dtype, self.zeroed = dtype, zeroed
        self._buffers: dict[tuple[int, int], Tensor] = {}
        self._replaced: list[Tensor] = []

    def get(self, device_index: int, stream: int, numel: int) -> Tensor:
        """The buffer of this device and stream, at least ``numel`` elements long."""
        buffer = self._buffers.get((device_index, stream))
        if buffer is None or buffer.numel() < numel:
            if buffer is not None:
                self._replaced.append(buffer)
            make = torch.zeros if self.zeroed else torch.empty
            buffer = self._buffers[(device_index, stream)] = make(numel, dtype=self.dtype,
                                                                  device=torch.device("cuda", device_index))
        return buffer


# Counters that kernels leave at zero, shared by every kernel of a stream (they run one after another).
COUNTERS = StreamBuffers(torch.int32, zeroed=True)
