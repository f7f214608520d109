"""``AttentionCallMode`` (module_stack.py): every SDPA call reaches ``on_attention`` with the innermost module's
qualified name and its arguments by name; a returned tensor replaces the call's output; the hooks go when the
mode exits."""

import pytest
import torch
import torch.nn.functional as F

from dam_compile.module_stack import AttentionCallMode


class Recorder(AttentionCallMode):
    """Records ``(module, args)`` of every call; returns ``replace(args)`` as the output."""

    def __init__(self, model, replace=lambda a: None):
        super().__init__(model)
        self.calls, self.replace = [], replace

    def on_attention(self, name, args):
        self.calls.append((name, args))
        return self.replace(args)


class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)  # runs (and returns) before the SDPA call

    def forward(self, x):
        q = self.proj(x).unflatten(-1, (2, 4)).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q, is_causal=True).transpose(1, 2).flatten(-2)


class Model(torch.nn.Module):
    """``blocks.{0,1}.attn`` and a call of the top-level module itself, positional and through torch._C."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict({"attn": Attention()}) for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = x + block["attn"](x)
        q = x.unflatten(-1, (2, 4)).transpose(1, 2)
        top = F.scaled_dot_product_attention(q, q, q, None, 0.0, False, scale=0.5)
        low = torch._C._nn.scaled_dot_product_attention(q, q, q, is_causal=True)
        return x + (top + low).transpose(1, 2).flatten(-2)


def test_calls_are_named_by_the_innermost_module_with_their_arguments_bound():
    model, x = Model(), torch.randn(1, 12, 8)
    with torch.no_grad():
        expected = model(x)
        with Recorder(model) as mode:
            out = model(x)
    assert torch.equal(out, expected)  # on_attention returned None: every call ran unchanged
    assert [name for name, _ in mode.calls] == ["blocks.0.attn", "blocks.1.attn", "", ""]
    first, top, low = mode.calls[0][1], mode.calls[2][1], mode.calls[3][1]
    assert first["query"].shape == (1, 2, 12, 4) and first["is_causal"] is True
    assert (first["attn_mask"], first["dropout_p"], first["scale"], first["enable_gqa"]) == (None, 0.0, None, False)
    assert (top["is_causal"], top["scale"]) == (False, 0.5)  # bound from positional arguments
    assert low["is_causal"] is True


def test_a_returned_tensor_replaces_the_calls_output():
    model, x = Model(), torch.randn(1, 12, 8)
    marker = lambda a: torch.full_like(a["query"], 3.0)  # noqa: E731
    with torch.no_grad(), Recorder(model, marker):
        out = model(x)
    with torch.no_grad():  # the same forward with every attention output replaced by hand
        h = x
        for block in model.blocks:
            h = h + 3.0
        expected = h + 6.0
    assert torch.allclose(out, expected)


def test_without_a_model_every_call_is_unnamed():
    q = torch.randn(1, 2, 8, 4)
    with Recorder(None) as mode:
        F.scaled_dot_product_attention(q, q, q)
    assert [name for name, _ in mode.calls] == [""]


def test_hooks_are_removed_on_exit_even_after_an_error():
    model = Model()

    def fail(_args):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), Recorder(model, fail):
        model(torch.randn(1, 12, 8))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with Recorder(model) as mode:  # a new mode starts from an empty module stack
        with torch.no_grad():
            model(torch.randn(1, 12, 8))
    assert [name for name, _ in mode.calls] == ["blocks.0.attn", "blocks.1.attn", "", ""]
    q = torch.randn(1, 2, 8, 4)
    F.scaled_dot_product_attention(q, q, q)  # outside the mode: not seen
    assert len(mode.calls) == 4


def test_other_torch_functions_pass_through():
    seen = []

    class Counting(Recorder):
        def on_attention(self, name, args):
            seen.append(name)

    x = torch.randn(3, 3)
    with Counting(None):
        y = torch.matmul(x, x) + torch.ones(3)
    assert torch.equal(y, x @ x + 1) and seen == []


def test_the_mode_is_abstract():
    with pytest.raises(TypeError):
        AttentionCallMode(None)
