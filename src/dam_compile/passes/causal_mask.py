"""Read a materialised causal mask as ``is_causal=True``.

Under ``torch.compile`` HuggingFace builds an explicit ``[B, 1, N, N]`` causal mask even for an unpadded prompt
(it cannot tell at trace time that no token is padded). That mask is O(N^2) memory (32 GiB at 128K in the
query dtype) and keeps SDPA off its flash/cuDNN kernels. When the mask is a function of sizes alone (no tensor
input: no ``attention_mask``, no cache position) and equals the causal mask, the op can use ``is_causal``
instead, and the mask's nodes lose their last user (Inductor drops them).

Whether it equals the causal mask is checked by running the mask's subgraph at small sizes. The sizes exceed
every integer constant in the subgraph, so a window or a threshold written into it (a sliding window of 4096, say) shows
up as a difference rather than hiding behind a short sample.

A static graph (``torch.compile``'s default first compile) writes the length itself into the mask's subgraph
(``arange(32768)``, ``expand(1, -1, 32768, 32768)``): there are no size symbols to sample. Up to 8K the constant
mask is checked exactly, at its own size. Beyond that the constants equal to the length are lifted back into one
size parameter, and that parameter is sampled like a symbolic size; every other constant stays as written, so a
window still shows up.

A mask that also reads an integer or bool tensor input (``generate()`` always passes ``attention_mask``) can be
the causal mask AND a per-key padding vector. Then the op takes ``is_causal=True`` and only the mask's last query
row, ``[B, 1, 1, N]`` (under causality the last row sees every key, so it is the padding vector): Inductor computes
that row and never the N x N mask. The claim is checked like the causal one, at sampled sizes with random 0/1 data
in the tensor inputs: the mask must equal ``causal & mask[..., -1:, :]`` on every sample. The pipeline then
describes that row once per forward (:mod:`.key_padding`), so an all-ones ``attention_mask`` costs nothing.
"""

from __future__ import annotations

import dataclasses
import itertools
import operator
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_aggregate

from .decide import example_value
from .find_sdpa import SDPASite

MAX_SAMPLE_ELEMENTS = 1 << 26  # one sampled mask: 64M entries (8K x 8K) at most
_RANDOM = ("rand", "bernoulli", "normal", "uniform", "dropout", "multinomial", "poisson", "exponential")


KEY_PADDING_ROW = (slice(None), slice(None), slice(-1, None), slice(None))  # mask[:, :, -1:, :]


SIZES_ONLY, KEY_PADDING = "causal", "causal and key padding"  # what a mask can be read as


def read_causal_mask(site: SDPASite) -> SDPASite:
    """``site`` with ``is_causal=True`` when its mask is the square causal mask: ``attn_mask=None`` when the mask
    is computed from sizes alone, or a new ``getitem`` node taking the mask's last row (``[B, 1, 1, N]``) when it
    is causal and a key padding vector read from tensor inputs; otherwise ``site`` unchanged."""
    reading = causal_reading(site)
    if reading is None:
        return site
    if reading == SIZES_ONLY:
        return dataclasses.replace(site, attn_mask=None, is_causal=True)
    return dataclasses.replace(site, attn_mask=key_padding_row(site.attn_mask), is_causal=True)


def key_padding_row(mask: Node) -> Node:
    """A new ``mask[:, :, -1:, :]`` node just after ``mask``: under causality its last row is the key padding."""
    with mask.graph.inserting_after(mask):
        row = mask.graph.call_function(operator.getitem, (mask, KEY_PADDING_ROW))
    row.meta.update({k: v for k, v in mask.meta.items() if k in ("stack_trace", "nn_module_stack")})
    row.meta["example_value"] = example_value(mask)[KEY_PADDING_ROW]
    return row


def causal_reading(site: SDPASite) -> str | None:
    """What ``site``'s mask is, without changing the graph: ``SIZES_ONLY`` (the square causal mask, from sizes
    alone), ``KEY_PADDING`` (causal AND a key padding vector read from tensor inputs), or ``None`` (neither,
    or not provably: the mask stays)."""
    mask = site.attn_mask
    if not isinstance(mask, Node) or site.is_causal is not False:
        return None
    q, k = example_value(site.query), example_value(site.key)
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or str(q.shape[-2]) != str(k.shape[-2]):
        return None  # SDPA's is_causal is top-left aligned: only the square case means the same
    subgraph = _mask_subgraph(mask)
    if subgraph is None:
        return None
    module, params, data = subgraph
    if data and example_value(mask).dtype != torch.bool:
        return None  # key padding is read from bool masks only (what HF builds for SDPA)
    length = q.shape[-2]
    if isinstance(length, int) and length * length > MAX_SAMPLE_ELEMENTS:
        params.append(_lift_static_length(module, length))
    samples = _samples(params, _largest_constant(module.graph))
    generator = torch.Generator().manual_seed(0)
    for values in samples:
        n = _length_at(length, params, values)
        tensors = [_random_data(t, params, values, length, n, generator) for t in data]
        if not _is_causal_at(module, n, (*values, *tensors), bool(data)):
            return None
    return KEY_PADDING if data else SIZES_ONLY


@dataclasses.dataclass(frozen=True)
class _SizeParameter:
    """An input of the standalone mask module: a SymInt of the graph (``expr`` its symbol, ``low``/``high`` what
    Dynamo's guards allow) or the static length lifted out of the constants (``expr`` None)."""

    expr: Any
    low: int
    high: float


def _mask_subgraph(mask: Node) -> tuple[GraphModule, list[_SizeParameter], list[torch.Tensor]] | None:
    """The nodes computing ``mask`` as a standalone module whose inputs are the SymInt placeholders it reads, then
    its integer or bool tensor inputs (their fake values returned as ``data``); ``None`` when it reads another
    tensor input, a module, an attribute or a random op."""
    needed: set[Node] = set()
    stack = [mask]
    while stack:
        node = stack.pop()
        if node in needed:
            continue
        needed.add(node)
        if node.op == "placeholder":
            value = example_value(node)
            data = isinstance(value, torch.Tensor) and (value.dtype == torch.bool or not value.is_floating_point())
            if not (isinstance(value, torch.SymInt) or data):
                return None
        elif node.op != "call_function" and node.op != "call_method":
            return None
        elif any(word in _name(node.target) for word in _RANDOM):
            return None
        stack.extend(node.all_input_nodes)
    graph, env, params = Graph(), {}, []
    ordered = [n for n in mask.graph.nodes if n in needed]  # graph order is a topological order
    sizes = [n for n in ordered if n.op == "placeholder" and isinstance(example_value(n), torch.SymInt)]
    tensors = [n for n in ordered if n.op == "placeholder" and n not in sizes]
    for node in [*sizes, *tensors, *(n for n in ordered if n.op != "placeholder")]:  # sizes first, then data
        env[node] = graph.node_copy(node, env.__getitem__)
    for node in sizes:
        value = example_value(node)
        bounds = value.node.shape_env.var_to_range.get(value.node.expr)
        params.append(_SizeParameter(
            value.node.expr, int(bounds.lower) if bounds is not None else 2,
            bounds.upper if bounds is not None else float("inf"),
        ))
    data = [example_value(n) for n in tensors]
    graph.output(env[mask])
    return GraphModule(torch.nn.Module(), graph), params, data


def _lift_static_length(module: GraphModule, length: int) -> _SizeParameter:
    """Make every integer constant of ``module`` that equals ``length`` read a new size input instead (placed after
    the symbolic sizes, before the tensor inputs)."""
    graph = module.graph
    after_sizes = next(n for n in graph.nodes if not (n.op == "placeholder" and isinstance(example_value(n), torch.SymInt)))
    with graph.inserting_before(after_sizes):  # after the size inputs, before the data inputs
        lifted = graph.placeholder("static_length")

    def lift(value: Any) -> Any:
        return lifted if _is_int(value) and value == length else value

    for node in graph.nodes:
        if node is not lifted:
            node.args, node.kwargs = map_aggregate(node.args, lift), map_aggregate(node.kwargs, lift)
    module.recompile()
    return _SizeParameter(None, 2, float("inf"))


def _length_at(length: Any, params: list[_SizeParameter], values: tuple[int, ...]) -> int:
    """The attention's length when the parameters take ``values``."""
    if isinstance(length, torch.SymInt):
        return int(length.node.expr.subs({p.expr: v for p, v in zip(params, values) if p.expr is not None}))
    return next((v for p, v in zip(params, values) if p.expr is None), int(length))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _largest_constant(graph: Graph) -> int:
    """The largest integer written into ``graph`` (a window, an offset, a threshold, a slice bound); 0 if none."""
    found = [0]

    def visit(value: Any) -> Any:
        if _is_int(value):  # sizes and offsets; floats are fill values
            found.append(min(abs(value), 1 << 30))
        return value

    for node in graph.nodes:
        map_aggregate((node.args, node.kwargs), visit)
    return max(found)


def _samples(params: list[_SizeParameter], constant: int) -> list[tuple[int, ...]]:
    """Values for the size parameters: the smallest each may take and two beyond every constant in the subgraph,
    within what Dynamo's guards allow."""
    choices = []
    for p in params:
        beyond = max(p.low, constant + 2)
        picks = sorted({v for v in (p.low, p.low + 1, beyond, beyond + 5) if v <= p.high})
        if not picks:
            return []
        choices.append(picks)
    return list(itertools.product(*choices))[:16]


def _random_data(
    fake: torch.Tensor, params: list[_SizeParameter], values: tuple[int, ...], length: Any, n: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Random 0/1 values for a tensor input of the mask, sized at the sample: the sampled symbols take their values;
    a static size equal to the attention's length, and a symbol of the input's own (Dynamo leaves an
    ``attention_mask``'s length apart from the keys'), take the sampled length ``n``."""
    symbols = {p.expr: v for p, v in zip(params, values) if p.expr is not None}
    shape = []
    for dim in fake.shape:
        if isinstance(dim, torch.SymInt):
            size = dim.node.expr.subs(symbols)
            shape.append(int(size.subs({free: n for free in size.free_symbols})))
        else:
            shape.append(n if dim == length else dim)
    with torch._subclasses.fake_tensor.unset_fake_temporarily():
        bits = torch.randint(0, 2, shape, generator=generator)
        return bits.bool() if fake.dtype == torch.bool else bits.to(fake.dtype)


def _is_causal_at(module: GraphModule, n: int, inputs: tuple, key_padding: bool = False) -> bool:
    """Whether the mask at these inputs is the ``n x n`` causal mask (``key_padding``: causal AND its own last
    row, a per-key vector)."""
    if n * n > MAX_SAMPLE_ELEMENTS:
        return False
    try:
        with torch._subclasses.fake_tensor.unset_fake_temporarily(), torch.no_grad():
            mask = module(*inputs)
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
    if key_padding:
        causal = causal & allowed[..., -1:, :]
    return bool((allowed == causal).all())


def _name(target: Any) -> str:
    return str(getattr(target, "__name__", target)).lower()
