"""A TorchFunctionMode that knows which module is running: every SDPA call is handed to ``on_attention``
with the qualified name of the innermost module around it (``model.layers.3.self_attn``)."""

from __future__ import annotations

import abc
from contextlib import ExitStack
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .passes.find_sdpa import bind_sdpa_args

SDPA_FUNCTIONS = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)


class AttentionCallMode(TorchFunctionMode, abc.ABC):
    """Subclasses implement ``on_attention(module_name, args)`` (args bound by name) and return ``None`` to let
    the call run unchanged, or a tensor to use as its output."""

    def __init__(self, model: torch.nn.Module | None) -> None:
        super().__init__()
        self.model = model  # None: no module names (every call gets "")
        self._stack: list[str] = []
        self._hooks = ExitStack()

    def __enter__(self):
        for name, module in self.model.named_modules() if self.model is not None else ():
            pre = module.register_forward_pre_hook(lambda _m, _a, n=name: self._stack.append(n))
            post = module.register_forward_hook(lambda _m, _a, _o: self._leave())
            self._hooks.callback(pre.remove)
            self._hooks.callback(post.remove)
        return super().__enter__()

    def _leave(self) -> None:  # a forward hook's return value would replace the module's output: return None
        self._stack.pop()

    def __exit__(self, *exc):
        self._hooks.close()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SDPA_FUNCTIONS:
            name = self._stack[-1] if self._stack else ""
            out = self.on_attention(name, bind_sdpa_args(args, kwargs))
            if out is not None:
                return out
        return func(*args, **kwargs)

    @abc.abstractmethod
    def on_attention(self, module_name: str, args: dict[str, Any]) -> torch.Tensor | None:
        """Called for every SDPA call with the innermost module's name and the call's arguments by name."""
