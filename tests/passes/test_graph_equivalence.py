"""The project's main guard: the rewritten graph is the original with each attention node replaced by exactly
the mask subgraph plus the op, checked as networkx graphs; and the numbers agree."""

import pytest
import torch

import dam_compile
from dam_compile.config import DAMConfig
from dam_compile.passes.verify import fx_to_digraph
from dam_compile.passes.pipeline import rewrite_attention
from dam_compile.passes.verify import expected_digraph
from dam_compile.cli.tiny_llama import TinyLlama, TinyLlamaConfig

from dam_testing import CPU_SPARSE, capture_graph
from graph_matching import isomorphic
from hf_models import build, ids_for

CFG = DAMConfig(**CPU_SPARSE)


class NoAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))

    def forward(self, x):
        return torch.softmax(self.net(x), dim=-1) * 2


def test_model_without_attention_compiles_to_an_unchanged_graph():
    model, x = NoAttention().eval(), torch.randn(3, 16)
    (gm,) = capture_graph(model, x)
    result = rewrite_attention(gm, CFG.mask_options())
    assert result.sites == [] and result.graph_module.code == gm.code
    assert isomorphic(fx_to_digraph(gm.graph), fx_to_digraph(result.graph_module.graph))
    out = torch.compile(model, backend="dam", options=CPU_SPARSE)(x)
    assert torch.allclose(out, model(x))
    assert dam_compile.graph_reports()[-1].sites == []


def _graphs(model, *args):
    (gm,) = capture_graph(model, *args)
    return gm, rewrite_attention(gm, CFG.mask_options())


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_hf_rewrite_is_exactly_the_expected_subgraph(name):
    model = build(name)
    with torch.no_grad():
        gm, result = _graphs(model, ids_for(name))
    assert len(result.replaced) == 2
    expected = expected_digraph(gm.graph, result.replaced)
    actual = fx_to_digraph(result.graph_module.graph)
    assert isomorphic(expected, actual)
    # The same check must fail on the unmodified graph, so it is not vacuous.
    assert not isomorphic(expected, fx_to_digraph(gm.graph))


def test_isomorphism_check_catches_a_changed_node():
    model = TinyLlama(TinyLlamaConfig(num_layers=2, hidden_size=64, intermediate_size=96, num_heads=4))
    with torch.no_grad():
        gm, result = _graphs(model.eval(), torch.randint(0, 100, (1, 40)))
    expected = expected_digraph(gm.graph, result.replaced)
    graph = result.graph_module.graph
    silu = next(n for n in graph.nodes if "silu" in str(n.target))
    silu.target = torch.nn.functional.gelu
    assert not isomorphic(expected, fx_to_digraph(graph))
