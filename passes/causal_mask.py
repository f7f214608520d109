"""Read a materialised causal mask as ``is_causal=True``.

Under ``torch.compile`` HuggingFace builds an explicit ``[B, 1, N, N]`` causal mask even for an unpadded prompt
(it cannot tell at trace time that no token is padded). That mask is O(N^2) memory (32 GiB at 128K in the
query dtype) and keeps SDPA off its flash/cuDNN kernels. When the mask is a function of sizes alone (no tensor
input: no ``attention_mask``, no cache position) and equals the causal mask, the op can use ``is_causal``
instead, and the mask's nodes lose their last user (Inductor drops them).

Whether it equals the causal mask is checked by running the mask's subgraph at small sizes. The sizes exceed
every integer constant in the subgraph, so a window or a threshold written into it (a sliding window of 4096, say) shows
up as a difference rather than hiding behind a short sample.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node

from .decide import example_value
from .find_sdpa import SDPASite

MAX_SAMPLE_ELEMENTS = 1 << 26  # one sampled mask: 64M entries (8K x 8K) at most
_RANDOM = ("rand", "bernoulli", "normal", "uniform", "dropout", "multinomial", "poisson", "exponential")


def read_causal_mask(site: SDPASite) -> SDPASite:
    """``site`` with ``attn_mask=None, is_causal=True`` when its mask is the square causal mask computed from
    sizes alone; otherwise ``site`` unchanged."""
    mask = site.attn_mask
    if not isinstance(mask, Node) or site.is_causal is not False:
        return site
    q, k = example_value(site.query), example_value(site.key)
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or str(q.shape[-2]) != str(k.shape[-2]):
        return site  # SDPA's is_causal is top-left aligned: only the square case means the same
    subgraph = _size_only_subgraph(mask)
    if subgraph is None:
        return site
    module, symbols = subgraph
    samples = _samples(symbols, _largest_constant(module.graph))
    if not samples or not all(_is_causal_at(module, symbols, values, q.shape[-2]) for values in samples):
        return site
    return dataclasses.replace(site, attn_mask=None, is_causal=True)


def _size_only_subgraph(mask: Node) -> tuple[GraphModule, list[Node]] | None:
    """The nodes computing ``mask`` as a standalone module whose inputs are the SymInt placeholders it reads,
    or ``None`` when it reads a tensor input, a module, an attribute or a random op."""
    needed: set[Node] = set()
    stack = [mask]
    while stack:
        node = stack.pop()
        if node in needed:
            continue
        needed.add(node)
        if node.op == "placeholder":
            if not isinstance(example_value(node), torch.SymInt):
                return None
        elif node.op != "call_function" and node.op != "call_method":
            return None
        elif any(word in _name(node.target) for word in _RANDOM):
            return None
        stack.extend(node.all_input_nodes)
    graph, env, symbols = Graph(), {}, []
    for node in mask.graph.nodes:  # graph order is a topological order
        if node not in needed:
            continue
        env[node] = graph.node_copy(node, env.__getitem__)
        if node.op == "placeholder":
            symbols.append(node)
    graph.output(env[mask])
    return GraphModule(torch.nn.Module(), graph), symbols


def _largest_constant(graph: Graph) -> int:
    """The largest integer written into ``graph`` (a window, an offset, a threshold); 0 if none."""
    found = [0]

    def visit(value: Any) -> None:
        if isinstance(value, int) and not isinstance(value, bool):  # sizes and offsets; floats are fill values
            found.append(min(abs(value), 1 << 30))
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)

    for node in graph.nodes:
        visit(node.args)
        visit(node.kwargs)
    return max(found)


def _samples(symbols: list[Node], constant: int) -> list[dict[Any, int]]:
    """Values for the size symbols: the smallest each may take and two beyond every constant in the subgraph,
    within what Dynamo's guards allow."""
    choices = []
    for node in symbols:
        value = example_value(node)
        expr = value.node.expr
        bounds = value.node.shape_env.var_to_range.get(expr)
        low = int(bounds.lower) if bounds is not None else 2
        high = bounds.upper if bounds is not None else float("inf")
        picks = sorted({v for v in (low, low + 1, max(low, constant + 2), max(low, constant + 2) + 5) if v <= high})
        if not picks:
            return []
        choices.append([(expr, v) for v in picks])
    return [dict(combo) for combo in itertools.product(*choices)][:16]


def _is_causal_at(module: GraphModule, symbols: list[Node], values: dict[Any, int], length: Any) -> bool:
    n = int(length.node.expr.subs(values)) if isinstance(length, torch.SymInt) else int(length)
    if n * n > MAX_SAMPLE_ELEMENTS:
        return False
    try:
        with torch._subclasses.fake_tensor.unset_fake_temporarily(), torch.no_grad():
            mask = module(*(values[example_value(s).node.expr] for s in symbols))
    except Exception:  # the subgraph does not run on these sizes: no claim
        return False
    if not isinstance(mask, torch.Tensor) or mask.dim() < 2 or tuple(mask.shape[-2:]) != (n, n):
        return False
    if mask.dtype == torch.bool:
        allowed = mask
    elif mask.is_floating_point():
        blocked = mask <= torch.finfo(mask.dtype).min
        if not bool(((mask == 0) | blocked).all()):
            return False
        allowed = mask == 0
    else:
        return False
    causal = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
    return bool((allowed == causal).all())


def _name(target: Any) -> str:
    return str(getattr(target, "__name__", target)).lower()
