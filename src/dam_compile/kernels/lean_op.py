"""``torch.library`` ops without ``custom_op``'s per-call Python layers.

``@torch.library.custom_op`` runs every call through an ``autograd.Function``, a Dynamo-disable frame and an
output-aliasing check: 23 us of host time per call on a 2-core CPU, against 6 us for the dispatcher calling the
Python kernel directly (measured with ``dam::sparse_attention``'s 19-argument schema and a kernel that does
nothing). The attention op and the plan ops run once per layer per forward, so that is paid hundreds of times
per decode step without CUDA graphs.
They are inference-only, so they need none of it: the pass keeps every site whose tensors require grad dense,
and Dynamo recompiles (so the pass decides again) when grad mode or ``requires_grad`` changes.

:func:`lean_op` defines the op from the function's annotated signature (``torch.library.infer_schema``, as
``custom_op`` does), registers the function as its ``CompositeExplicitAutograd`` kernel, and gives the same
``register_fake`` decorator. With no autograd kernel (one costs a redispatch per call: 18 us), a backward
through the op (only reachable by running an exported graph with grad enabled) gets PyTorch's
autograd-not-implemented warning, as any op without a derivative does; the forward is unaffected.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch


class LeanOp:
    """The op ``qualname`` (``"ns::name"``) computed by ``fn``; calling it dispatches ``torch.ops.ns.name``."""

    def __init__(self, qualname: str, fn: Callable[..., Any]):
        namespace, name = qualname.split("::")
        self.qualname, self.fn = qualname, fn
        self._lib = torch.library.Library(namespace, "FRAGMENT")
        self._lib.define(name + torch.library.infer_schema(fn, mutates_args=()))
        self._lib.impl(name, fn, "CompositeExplicitAutograd")
        self.opoverload = getattr(getattr(torch.ops, namespace), name).default
        functools.update_wrapper(self, fn)

    def register_fake(self, fake: Callable[..., Any]) -> Callable[..., Any]:
        """Register ``fake`` (shapes and dtypes of the outputs, nothing computed) for tracing; returns it."""
        torch.library.register_fake(self.qualname, fake, lib=self._lib)
        return fake

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.opoverload(*args, **kwargs)


def lean_op(qualname: str) -> Callable[[Callable[..., Any]], LeanOp]:
    """Decorator: ``@lean_op("dam::name")`` over an annotated function makes it the op ``torch.ops.dam.name``."""
    return lambda fn: LeanOp(qualname, fn)

