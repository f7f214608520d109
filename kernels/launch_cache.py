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

from collections import OrderedDict
from typing import Any, Hashable, Sequence

from torch import Tensor


def tensors_key(*tensors: Tensor) -> tuple | None:
    """The part of a launch key the tensors fix: dtype, device, shape and strides of each, in order; ``None``
    when some tensor's address is not a multiple of 16 bytes (what Triton specialises pointers on: such calls
    are neither kept nor served). The kernels run on the current device, which is the tensors' (as for any
    launch of a CUDA kernel)."""
    addresses = 0
    for t in tensors:
        addresses |= t.data_ptr()
    if addresses % 16:
        return None
    return tuple([(t.dtype, t.get_device(), t.shape, t.stride()) for t in tensors])


class CachedLaunch:
    """One compiled kernel bound to its grid, with the argument list of the call that compiled it; calling it
    with the per-call values (in the order of the cache's ``per_call`` names) launches it on ``stream`` (a raw
    CUDA stream handle; the current stream when ``None``). ``extra`` holds what the launcher derived once for this key (descriptor templates, strides)."""

    __slots__ = ("runner", "template", "slots", "extra")

    def __init__(self, runner: Any, template: list, slots: tuple[int, ...], extra: Any):
        self.runner, self.template, self.slots, self.extra = runner, template, slots, extra

    def __call__(self, *per_call: Any, stream: int | None = None) -> None:
        values = self.template.copy()
        for slot, value in zip(self.slots, per_call):
            values[slot] = value
        self.runner(*values, stream=stream)


class LaunchCache:
    """Launches of ``kernel`` (a ``@triton.jit`` or ``@gluon.jit`` function) by key, at most ``maxsize`` kept
    (least recently used dropped). ``per_call`` names the arguments that change between calls of one key."""

    def __init__(self, kernel: Any, per_call: Sequence[str], maxsize: int = 256):
        names = list(kernel.arg_names)
        missing = [name for name in per_call if name not in names]
        if missing:
            raise ValueError(f"per_call names {missing} are not arguments of {kernel.__name__}")
        self.kernel, self.names, self.maxsize = kernel, names, maxsize
        self.slots = tuple(names.index(name) for name in per_call)
        self._entries: OrderedDict[Hashable, CachedLaunch] = OrderedDict()

    def get(self, key: Hashable) -> CachedLaunch | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def launch(self, key: Hashable | None, grid: tuple[int, ...], args: dict[str, Any], extra: Any = None) -> None:
        """Launch through Triton's binder (compiling on first use) and, unless ``key`` is ``None``, keep the
        compiled kernel and this call's arguments (``args``: every argument and launch option by name)."""
        compiled = self.kernel[grid](**args)
        if key is None or compiled is None:
            return
        params = self.kernel.params
        template = [args[p.name] if p.name in args else p.default for p in params]
        grid3 = tuple(grid) + (1,) * (3 - len(grid))
        self._entries[key] = CachedLaunch(compiled[grid3], template, self.slots, extra)
        if len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
