import os

import torch

# Triton kernels run in the interpreter where there is no GPU (CI); set before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import dam_compile  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_state():
    """Each test starts with no cached compiled graphs, reports or run-time counts."""
    torch._dynamo.reset()
    dam_compile.clear_graph_reports()
    dam_compile.reset_runtime_stats()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()
