"""Repeat launches of a compiled Triton or Gluon kernel without Triton's per-call binding.

``kernel[grid](**args)`` binds every argument by name, computes each one's specialization (dtype, 16-byte
alignment of pointers, integers equal to 1 or divisible by 16) and looks the compiled kernel up from it: most of
the host time of a launch. An attention site repeats its call: same shapes, strides, dtypes and flags, new
tensors. A launcher that builds a key fixing everything the specialization reads, except the addresses of its
per-call tensors, stores the compiled kernel under that key with its positional argument list; a repeat call
puts its tensors into their slots and calls the compiled kernel's own launcher.

The caller owns the key's soundness: it must fix every non-tensor argument, the grid, and the dtype and
16-byte alignment of every per-call tensor (callers only store and reuse calls whose tensors are all aligned).
"""

from __future__ import annotations

from typing import Any, Hashable, Sequence

from torch import Tensor
from triton import knobs


def tensors_key(*tensors: Tensor) -> tuple | None:
    """The part of a launch key the tensors fix: dtype, shape and strides of each, in order (flat: it is built
    and hashed on every call); ``None`` when some tensor's address is not a multiple of 16 bytes (what Triton
    specialises pointers on: such calls are neither kept nor served). The caller adds the device."""
    key: list = []
    addresses = 0
    for t in tensors:
        addresses |= t.data_ptr()
        key += (t.dtype, t.shape, t.stride())
    return None if addresses % 16 else tuple(key)


class CachedLaunch:
    """One compiled kernel bound to its grid, with the argument list of the call that compiled it; calling it
    with the per-call values (in the order of the cache's ``per_call`` names) launches it on ``stream`` (a raw
    CUDA stream handle; the current stream when ``None``). ``extra`` holds what the launcher derived once for
    this key (descriptor templates, strides)."""

    __slots__ = ("compiled", "grid", "template", "slots", "extra")

    def __init__(self, compiled: Any, grid: tuple[int, int, int], template: list, slots: tuple[int, ...],
                 extra: Any):
        self.compiled, self.grid, self.template, self.slots, self.extra = compiled, grid, template, slots, extra

    def __call__(self, *per_call: Any, stream: int | None = None) -> None:
        values = self.template.copy()
        for slot, value in zip(self.slots, per_call):
            values[slot] = value
        if stream is None or _hooked(knobs.runtime.launch_enter_hook) or _hooked(knobs.runtime.launch_exit_hook):
            self.compiled[self.grid](*values, stream=stream)  # Triton's runner: finds the stream, calls the hooks
            return
        # What the runner does when no launch hook is set (a profiler sets one), minus its closure, its launch
        # metadata and the calls of the empty hook chains: 3 us of a 40 us op call.
        compiled = self.compiled
        compiled.run(*self.grid, stream, compiled.function, compiled.packed_metadata, None, None, None, *values)


def _hooked(hook: Any) -> bool:
    """Whether a launch hook is set: Triton >= 3.4 keeps a ``HookChain`` (a list of calls), older Triton a
    callable or ``None``."""
    return hook is not None and bool(getattr(hook, "calls", True))


class LaunchCache:
    """Launches of ``kernel`` (a ``@triton.jit`` or ``@gluon.jit`` function) by key, at most ``maxsize`` kept
    (the oldest dropped: a model has a few sites per shape, so eviction is rare and its order hardly matters).
    ``per_call`` names the arguments that change between calls of one key."""

    def __init__(self, kernel: Any, per_call: Sequence[str], maxsize: int = 256):
        names = list(kernel.arg_names)
        missing = [name for name in per_call if name not in names]
        if missing:
            raise ValueError(f"per_call names {missing} are not arguments of {kernel.__name__}")
        self.kernel, self.names, self.maxsize = kernel, names, maxsize
        self.slots = tuple(names.index(name) for name in per_call)
        self._entries: dict[Hashable, CachedLaunch] = {}

    def get(self, key: Hashable) -> CachedLaunch | None:
        return self._entries.get(key)

    def launch(self, key: Hashable | None, grid: tuple[int, ...], args: dict[str, Any], extra: Any = None) -> None:
        """Launch through Triton's binder (compiling on first use) and, unless ``key`` is ``None``, keep the
        compiled kernel and this call's arguments (``args``: every argument and launch option by name)."""
        compiled = self.kernel[grid](**args)
        if key is None or compiled is None:
            return
        params = self.kernel.params
        template = [args[p.name] if p.name in args else p.default for p in params]
        grid3 = tuple(grid) + (1,) * (3 - len(grid))
        compiled[grid3]  # loads the kernel onto the device (what the first runner call would do)
        self._entries[key] = CachedLaunch(compiled, grid3, template, self.slots, extra)
        if len(self._entries) > self.maxsize:
            del self._entries[next(iter(self._entries))]

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
