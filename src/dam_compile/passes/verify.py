"""Structural check of a rewrite: the rewritten graph must equal the original with each rewritten SDPA node
replaced by exactly its mask subgraph plus the sparse op, and every other node and edge untouched.

Graphs become ``networkx`` DiGraphs: nodes carry ``op``, ``target`` and ``consts`` (the non-node arguments),
edges carry ``pos`` (the argument positions through which one node feeds another).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import networkx as nx
from torch.fx import Graph, Node
from torch.fx.node import _get_qualified_name

from .decide import op_scale
from .find_sdpa import read_site
from .insert_mask import PLAN_OP_ARGS
from .key_padding import KEY_PADDING, KeyPaddingNodes
from .rewrite import SPARSE_ATTENTION


class RewriteCheckError(AssertionError):
    """The rewritten graph is not the expected rewrite of the original."""


@dataclass(frozen=True)
class RewrittenSite:
    """What the pass did for one site: the original node's name and the nodes it put in its place."""

    name: str
    plan_target: Any
    plan: Node
    plan_outputs: tuple[Node, ...]
    op: Node
    patterns: tuple[Node, ...] = ()  # get_attr nodes of a calibrated site's token pattern
    decode: bool = False  # a decode plan: reads the mask too, and its patterns feed only the plan
    kv_sources: tuple[str, str] | None = None  # original names of the key/value the op reads (before repeat_kv)
    mask_dropped: bool = False  # the original mask was read as is_causal=True: nothing new reads it
    padding: KeyPaddingNodes | None = None  # ... except its key padding row and description, shared by its sites
    plan_inputs: tuple[Node, ...] = ()  # get_attr nodes only the plan reads (a calibrated site's dynamic heads)

    def roles(self) -> dict[Node, str]:
        roles = {self.plan: f"{self.name}/plan", self.op: f"{self.name}/attn"}
        if self.padding is not None:
            roles.update(self.padding.roles())
        roles.update({out: f"{self.name}/plan.{i}" for i, out in enumerate(self.plan_outputs)})
        roles.update({p: f"{self.name}/pattern.{i}" for i, p in enumerate(self.patterns)})
        roles.update({p: f"{self.name}/plan_input.{i}" for i, p in enumerate(self.plan_inputs)})
        return roles


def target_name(node: Node) -> str:
    return target_name_of(node.target) if node.op == "call_function" else str(node.target)


def _inputs(value: Any, pos: str) -> Iterator[tuple[str, Node]]:
    if isinstance(value, Node):
        yield pos, value
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _inputs(item, f"{pos}.{i}")
    elif isinstance(value, dict):
        for k, item in value.items():
            yield from _inputs(item, f"{pos}.{k}")


def _consts(node: Node) -> str:
    def strip(value: Any) -> Any:
        if isinstance(value, Node):
            return "%"
        if isinstance(value, (list, tuple)):
            return type(value)(strip(v) for v in value)
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items()}
        return value

    return repr((strip(node.args), strip(node.kwargs)))


def fx_to_digraph(graph: Graph, key: Callable[[Node], str] = lambda n: n.name) -> nx.DiGraph:
    """The FX graph as a DiGraph keyed by ``key(node)``."""
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(key(node), op=node.op, target=target_name(node), consts=_consts(node))
    for node in graph.nodes:
        edges: dict[str, list[str]] = {}
        for pos, arg in [*_inputs(node.args, "args"), *_inputs(node.kwargs, "kwargs")]:
            edges.setdefault(key(arg), []).append(pos)
        for src, positions in edges.items():
            g.add_edge(src, key(node), pos=tuple(sorted(positions)))
    return g


def expected_digraph(original: Graph, rewritten: list[RewrittenSite]) -> nx.DiGraph:
    """The original graph with each rewritten SDPA node replaced by the expected subgraph. The inserted
    nodes' constant arguments come from the config, so they are not compared (``consts=None``)."""
    g = fx_to_digraph(original)
    by_name = {node.name: node for node in original.nodes}
    for site in rewritten:
        sdpa = read_site(by_name[site.name])
        plan, attn = f"{site.name}/plan", f"{site.name}/attn"
        users = [(dst, g.edges[site.name, dst]["pos"]) for dst in g.successors(site.name)]
        g.remove_node(site.name)
        g.add_node(plan, op="call_function", target=target_name_of(site.plan_target), consts=None)
        key, value = site.kv_sources or (sdpa.key.name, sdpa.value.name)
        _add_input(g, sdpa.query.name, plan, "args.0")
        _add_input(g, key, plan, "args.1")
        g.add_node(attn, op="call_function", target=target_name_of(SPARSE_ATTENTION), consts=None)
        for i, src in enumerate((sdpa.query.name, key, value)):
            _add_input(g, src, attn, f"args.{i}")
        for i in range(len(site.plan_outputs)):
            out = f"{site.name}/plan.{i}"
            g.add_node(out, op="call_function", target=target_name_of(operator.getitem), consts=None)
            _add_input(g, plan, out, "args.0")
            _add_input(g, out, attn, f"args.{3 + i}")
        # A decode plan reads the mask (args.2), then the calibrated diagonals and columns; a prefill plan reads
        # the calibrated pattern buffers after query and key, and they also feed the op's token pattern. The mask
        # read is the original one, none (read as is_causal), or the shared key padding row of the original,
        # with its key ranges and kind.
        mask = sdpa.attn_mask.name if isinstance(sdpa.attn_mask, Node) and not site.mask_dropped else None
        if site.padding is not None:
            roles = _add_key_padding(g, sdpa.attn_mask.name)
            mask = roles["row"]
            _add_input(g, roles["kv_range"], attn, "kwargs.kv_range")
            _add_input(g, roles["kind"], attn, "kwargs.padding_kind")
        if site.decode and mask is not None:
            _add_input(g, mask, plan, "args.2")
        for i, node in enumerate(site.patterns):
            role = f"{site.name}/pattern.{i}"
            g.add_node(role, op="get_attr", target=str(node.target), consts=None)
            _add_input(g, role, plan, f"args.{(3 if site.decode else 2) + i}")
            if not site.decode:
                _add_input(g, role, attn, f"args.{3 + len(site.plan_outputs) + i}")
        if mask is not None:
            _add_input(g, mask, attn, f"args.{3 + PLAN_OP_ARGS}")
        # Buffers only the plan reads, and a symbolic scale (which also feeds the op), go to the plan by name:
        # their places are read from the plan node.
        for i, node in enumerate(site.plan_inputs):
            role = f"{site.name}/plan_input.{i}"
            g.add_node(role, op="get_attr", target=str(node.target), consts=None)
            for pos in _positions(site.plan, node):
                _add_input(g, role, plan, pos)
        if isinstance(sdpa.scale, Node):
            _add_input(g, sdpa.scale.name, attn, f"args.{4 + PLAN_OP_ARGS}")
            for pos in _positions(site.plan, sdpa.scale, by_name=True):
                _add_input(g, sdpa.scale.name, plan, pos)
        for dst, pos in users:
            g.add_edge(attn, dst, pos=pos)
    return g


def _add_key_padding(g: nx.DiGraph, mask: str) -> dict[str, str]:
    """The shared key padding nodes of the original ``mask`` (added once, whichever site comes first): the row
    ``mask[:, :, -1:, :]``, ``dam::key_padding`` on it and its two outputs. Their roles by short name."""
    stem = f"{mask}/key_padding"
    roles = {part: f"{stem}.{part}" for part in ("row", "call", "kv_range", "kind")}
    if roles["row"] not in g:
        getitem = target_name_of(operator.getitem)
        g.add_node(roles["row"], op="call_function", target=getitem, consts=None)
        _add_input(g, mask, roles["row"], "args.0")
        g.add_node(roles["call"], op="call_function", target=target_name_of(KEY_PADDING), consts=None)
        _add_input(g, roles["row"], roles["call"], "args.0")
        for part in ("kv_range", "kind"):
            g.add_node(roles[part], op="call_function", target=getitem, consts=None)
            _add_input(g, roles["call"], roles[part], "args.0")
    return roles


def _positions(user: Node, arg: Node, by_name: bool = False) -> list[str]:
    """Where ``user`` reads ``arg`` (``args.N`` / ``kwargs.NAME``); ``by_name`` matches a node of the original
    graph against its copy by name."""
    found = [*_inputs(user.args, "args"), *_inputs(user.kwargs, "kwargs")]
    return [pos for pos, node in found if (node.name == arg.name if by_name else node is arg)]


def actual_digraph(rewritten_graph: Graph, val_map: dict[Node, Node], sites: list[RewrittenSite]) -> nx.DiGraph:
    """The rewritten graph keyed like :func:`expected_digraph`: copied nodes by their original name, inserted
    nodes by role; any other node is keyed ``unexpected:<name>`` so it can never match."""
    names = {copy: orig.name for orig, copy in val_map.items()}
    roles: dict[Node, str] = {}
    for site in sites:
        roles.update(site.roles())
    g = fx_to_digraph(rewritten_graph, key=lambda n: roles.get(n) or names.get(n) or f"unexpected:{n.name}")
    for node, role in roles.items():
        g.nodes[role]["consts"] = None
    return g


def graph_differences(expected: nx.DiGraph, actual: nx.DiGraph) -> list[str]:
    """Human-readable differences between two keyed DiGraphs (empty when equal)."""
    diffs = [f"missing node {n}" for n in expected.nodes if n not in actual.nodes]
    diffs += [f"unexpected node {n}" for n in actual.nodes if n not in expected.nodes]
    for n in expected.nodes:
        if n in actual.nodes and expected.nodes[n] != actual.nodes[n]:
            diffs.append(f"node {n} changed: {expected.nodes[n]} -> {actual.nodes[n]}")
    for u, v, data in expected.edges(data=True):
        if not actual.has_edge(u, v):
            diffs.append(f"missing edge {u} -> {v} {data['pos']}")
        elif actual.edges[u, v] != data:
            diffs.append(f"edge {u} -> {v} changed: {data['pos']} -> {actual.edges[u, v]['pos']}")
    diffs += [f"unexpected edge {u} -> {v}" for u, v in actual.edges if not expected.has_edge(u, v)]
    return diffs


def check_rewrite(original: Graph, rewritten: Graph, val_map: dict[Node, Node], sites: list[RewrittenSite]) -> None:
    """Raise :class:`RewriteCheckError` listing every difference from the expected rewrite."""
    diffs = graph_differences(expected_digraph(original, sites), actual_digraph(rewritten, val_map, sites))
    diffs += site_constant_differences(original, sites)
    if diffs:
        shown = "\n  ".join(diffs[:20])
        more = f"\n  ... and {len(diffs) - 20} more" if len(diffs) > 20 else ""
        raise RewriteCheckError(f"rewritten graph differs from the expected rewrite:\n  {shown}{more}")


def site_constant_differences(original: Graph, sites: list[RewrittenSite]) -> list[str]:
    """The constants each op and plan take from its site rather than from the config, against the original call:
    ``is_causal`` (True where the pass read the mask as causal), ``enable_gqa`` (True where it reads K/V before
    ``repeat_kv``) and a constant scale (a symbolic one is an input edge, checked with the graph)."""
    by_name = {node.name: node for node in original.nodes}
    diffs = []
    for site in sites:
        sdpa = read_site(by_name[site.name])
        grouped = site.kv_sources is not None and site.kv_sources != (sdpa.key.name, sdpa.value.name)
        want = {"is_causal": bool(sdpa.is_causal) or site.mask_dropped, "enable_gqa": bool(sdpa.enable_gqa) or grouped}
        for node, role in ((site.op, "attn"), (site.plan, "plan")):
            for name, value in want.items():
                if name in node.kwargs and node.kwargs[name] != value:
                    diffs.append(f"{site.name}/{role}: {name}={node.kwargs[name]!r}, the call's is {value!r}")
        scale = op_scale(sdpa)
        if not isinstance(scale, Node) and site.op.args[-1] != scale:
            diffs.append(f"{site.name}/attn: scale={site.op.args[-1]!r}, the call's is {scale!r}")
    return diffs


def target_name_of(target: Any) -> str:
    try:
        return _get_qualified_name(target)
    except Exception:
        return str(target)


def _add_input(g: nx.DiGraph, src: str, dst: str, pos: str) -> None:
    if g.has_edge(src, dst):
        g.edges[src, dst]["pos"] = tuple(sorted((*g.edges[src, dst]["pos"], pos)))
    else:
        g.add_edge(src, dst, pos=(pos,))
