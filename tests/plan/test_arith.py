"""The scalar helpers every layer shares (``arith``): ceiling division, also on symbolic sizes as one expression,
and SDPA's default score scale, with a given scale passed through untouched."""

import math

import pytest
import torch
from torch._dynamo.source import ConstantSource
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from dam_compile.plan.arith import cdiv, softmax_scale


@pytest.mark.parametrize("b", [1, 3, 16, 128])
def test_cdiv_is_the_ceiling_of_the_quotient(b):
    for a in range(0, 300, 7):
        assert cdiv(a, b) == math.ceil(a / b) == -(-a // b)


def test_cdiv_and_scale_stay_symbolic_on_symbolic_sizes():
    """On the symbolic sizes of a traced planner (``torch.compile``'s dynamic shapes): one expression in the
    ``(a + b - 1) // b`` form the plans' fake shapes use, and a symbolic scale, neither guarding on a value
    (``math.sqrt`` of a symbolic head dim would specialize the graph on it)."""
    env = ShapeEnv()

    def symbolic(value: int, name: str):
        return env.create_symintnode(env.create_symbol(value, source=ConstantSource(name)), hint=value)

    length, dim = symbolic(1000, "length"), symbolic(64, "dim")
    blocks = cdiv(length, 128)
    assert isinstance(blocks, torch.SymInt) and blocks.node.hint == 8
    assert str(blocks.node.expr) == f"(({length.node.expr} + 127)//128)"
    scale = softmax_scale(None, dim)
    assert isinstance(scale, torch.SymFloat) and scale.node.hint == pytest.approx(0.125)
    assert not env.guards


@pytest.mark.parametrize("head_dim", [1, 48, 64, 80, 128])
def test_default_scale_is_sdpas(head_dim):
    """``None`` gives ``1 / sqrt(head_dim)``: the scale SDPA uses without one (checked through SDPA itself)."""
    assert softmax_scale(None, head_dim) == 1.0 / math.sqrt(head_dim)
    g = torch.Generator().manual_seed(head_dim)
    q, k, v = (torch.randn(1, 2, 5, head_dim, dtype=torch.float64, generator=g) for _ in range(3))
    default = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    explicit = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=softmax_scale(None, head_dim))
    assert ((default - explicit).norm() / default.norm()).item() < 1e-12


def test_a_given_scale_comes_back_as_given():
    for scale in (0.3, 1, 0.0):
        assert softmax_scale(scale, 64) is scale  # not converted: a symbolic float would be specialized
    sentinel = object()
    assert softmax_scale(sentinel, 64) is sentinel
