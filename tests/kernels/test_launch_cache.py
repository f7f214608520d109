"""LaunchCache: a kept launch passes the compiling call's arguments in the kernel's order, with each repeat
call's own per-call values in their slots, straight to the compiled launcher unless a launch hook is set;
entries are per key and the oldest goes first.

A stand-in kernel records what the binder and the compiled launcher receive (no GPU needed); the Hopper path's
use of it is tested on the GPU in ``test_hopper_launch.py``.
"""

import inspect

import pytest
import torch
from triton import knobs

from dam_compile.kernels.launch_cache import LaunchCache, tensors_key


class RecordingKernel:
    """Looks like a jitted kernel ``(A, x, B, n, FLAG: constexpr = 7)`` to LaunchCache: binding records the call
    and returns a compiled kernel whose launcher records its grid and positional arguments."""

    def __init__(self):
        def signature(A, x, B, n, FLAG=7):
            pass
        self.__name__ = "kernel"
        self.params = list(inspect.signature(signature).parameters.values())
        self.arg_names = [p.name for p in self.params]
        self.bound, self.launched = [], []

    def __getitem__(self, grid):
        def bind(**args):
            self.bound.append((grid, args))
            return Compiled(self.launched)

        return bind


class Compiled:
    """Triton's CompiledKernel as LaunchCache uses it: ``[grid]`` gives the runner (which finds the stream and
    calls the launch hooks), ``run`` is the launcher itself."""

    function, packed_metadata = "cu_function", "packed_metadata"

    def __init__(self, launched):
        self.launched = launched

    def __getitem__(self, grid):
        return lambda *values, stream=None: self.launched.append(("runner", grid, values, stream))

    def run(self, grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata, enter_hook,
            exit_hook, *values):
        assert (function, packed_metadata) == (self.function, self.packed_metadata)
        assert launch_metadata is enter_hook is exit_hook is None
        self.launched.append(("run", (grid_x, grid_y, grid_z), values, stream))


@pytest.fixture
def kernel():
    return RecordingKernel()


def make_cache(kernel, maxsize=256):
    return LaunchCache(kernel, per_call=("A", "B"), maxsize=maxsize)


def test_repeat_call_swaps_in_its_own_per_call_values(kernel):
    cache = make_cache(kernel)
    cache.launch("k", (3,), dict(A="a0", x=1.5, B="b0", n=10))
    assert kernel.bound == [((3,), dict(A="a0", x=1.5, B="b0", n=10))]
    entry = cache.get("k")
    entry("a1", "b1")
    entry("a2", "b2", stream=42)
    # every argument in signature order, defaults filled, grid padded to 3 dims; without a stream the runner
    # finds it, with one the launcher is called directly
    assert kernel.launched == [("runner", (3, 1, 1), ("a1", 1.5, "b1", 10, 7), None),
                               ("run", (3, 1, 1), ("a2", 1.5, "b2", 10, 7), 42)]
    assert len(kernel.bound) == 1  # the binder ran once


def test_a_launch_hook_sees_kept_launches(kernel):
    """A profiler's launch hook (Triton's launch_enter_hook) is honoured: kept launches go through the runner."""
    cache = make_cache(kernel)
    cache.launch("k", (2,), dict(A="a0", x=1.5, B="b0", n=10))
    hook = lambda metadata: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        cache.get("k")("a1", "b1", stream=7)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    cache.get("k")("a2", "b2", stream=7)
    assert [call[0] for call in kernel.launched] == ["runner", "run"]


def test_calls_without_key_are_not_kept_and_keys_are_separate(kernel):
    cache = make_cache(kernel)
    cache.launch(None, (1,), dict(A="a", x=0.0, B="b", n=1))
    assert len(cache) == 0 and cache.get(None) is None
    cache.launch("k1", (1,), dict(A="a", x=0.0, B="b", n=1))
    cache.launch("k2", (2, 4), dict(A="a", x=2.0, B="b", n=2, FLAG=9))
    cache.get("k2")("A", "B")
    assert kernel.launched[-1] == ("runner", (2, 4, 1), ("A", 2.0, "B", 2, 9), None)
    assert cache.get("k3") is None


def test_oldest_entry_is_dropped(kernel):
    cache = make_cache(kernel, maxsize=2)
    for key in ("k1", "k2", "k3"):
        cache.launch(key, (1,), dict(A="a", x=0.0, B="b", n=1))
    assert len(cache) == 2 and cache.get("k1") is None and cache.get("k2") is not None


def test_per_call_names_must_be_kernel_arguments(kernel):
    with pytest.raises(ValueError, match="per_call names \\['C'\\]"):
        LaunchCache(kernel, per_call=("A", "C"))


def test_tensors_key_fixes_layout_and_refuses_misaligned_addresses():
    a, b = torch.zeros(4, 8), torch.ones(4, 8)
    assert tensors_key(a, b) == tensors_key(b, a) == tensors_key(torch.empty(4, 8), torch.empty(4, 8))
    assert tensors_key(a, b) != tensors_key(a, b.t().contiguous().t())  # same shape, other strides
    assert tensors_key(a, b) != tensors_key(a, b.to(torch.float16))
    assert tensors_key(a, a.view(-1)[1:]) is None  # 4 bytes past an aligned address
