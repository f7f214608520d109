"""``lean_op``: an op defined from an annotated function dispatches to it through ``torch.ops``, traces through
its fake, passes ``opcheck``, and runs a backward only with PyTorch's autograd-not-implemented warning."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from dam_compile.kernels.lean_op import LeanOp, lean_op

CALLS = []


@lean_op("dam_lean_op_test::scaled_rows")
def scaled_rows(x: torch.Tensor, scale: float, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x[:rows] * scale, row sums of it)``."""
    CALLS.append(rows)
    head = x[:rows] * scale
    return head, head.sum(-1)


@scaled_rows.register_fake
def _(x, scale, rows):
    return x.new_empty((rows, x.shape[-1])), x.new_empty((rows,))


def test_the_op_is_defined_from_the_signature_and_dispatches_to_the_function():
    assert isinstance(scaled_rows, LeanOp) and scaled_rows.__name__ == "scaled_rows"
    assert scaled_rows.__doc__.startswith("``(x[:rows] * scale")
    schema = str(torch.ops.dam_lean_op_test.scaled_rows.default._schema)
    assert schema == "dam_lean_op_test::scaled_rows(Tensor x, float scale, SymInt rows) -> (Tensor, Tensor)"
    x = torch.randn(5, 7, dtype=torch.float64)
    CALLS.clear()
    for call in (scaled_rows, torch.ops.dam_lean_op_test.scaled_rows, scaled_rows.opoverload):
        head, sums = call(x, 0.5, 3)
        assert torch.equal(head, x[:3] * 0.5) and torch.equal(sums, (x[:3] * 0.5).sum(-1))
    assert CALLS == [3, 3, 3]


def test_the_fake_gives_shapes_without_running_the_function():
    CALLS.clear()
    with FakeTensorMode():
        head, sums = scaled_rows(torch.empty(9, 4), 2.0, 6)
    assert head.shape == (6, 4) and sums.shape == (6,) and CALLS == []


def test_traces_as_one_node_and_compiles():
    def fn(x):
        head, sums = scaled_rows(x, 2.0, 2)
        return head.exp() + sums[:, None]

    graph = torch.fx.experimental.proxy_tensor.make_fx(fn, tracing_mode="fake")(torch.randn(4, 3))
    targets = [n.target for n in graph.graph.nodes if n.op == "call_function"]
    assert torch.ops.dam_lean_op_test.scaled_rows.default in targets
    x = torch.randn(4, 3)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    assert torch.allclose(compiled(x), fn(x))


def test_opcheck():
    torch.library.opcheck(scaled_rows.opoverload, (torch.randn(6, 5), 1.5, 4))


def test_backward_warns_that_the_op_has_no_derivative():
    """No autograd kernel (it would cost a redispatch per call): a backward through the op gets PyTorch's
    autograd-not-implemented warning; the forward is unaffected."""
    x = torch.randn(3, 2, requires_grad=True)
    head, _ = scaled_rows(x, 2.0, 3)
    assert torch.equal(head.detach(), x.detach() * 2.0)
    with pytest.warns(UserWarning, match="autograd kernel was not registered"):
        head.sum().backward()


def test_arguments_are_checked_against_the_schema():
    CALLS.clear()
    with pytest.raises(RuntimeError, match="rows"):
        scaled_rows(torch.randn(2, 2), 1.0, "three")
    assert CALLS == []
