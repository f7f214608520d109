"""Label-free comparison of FX graphs turned into networkx digraphs (``passes.verify.fx_to_digraph``): shared by
the graph-equivalence tests and the hybrid-profile tests."""

from __future__ import annotations

import networkx as nx
from networkx.algorithms.isomorphism import DiGraphMatcher


def _node_match(a: dict, b: dict) -> bool:
    consts_match = a["consts"] is None or b["consts"] is None or a["consts"] == b["consts"]
    return a["op"] == b["op"] and a["target"] == b["target"] and consts_match


def _edge_match(a: dict, b: dict) -> bool:
    return a["pos"] == b["pos"]


def isomorphic(expected: nx.DiGraph, actual: nx.DiGraph) -> bool:
    """The graphs match as shapes with node/edge attributes, whatever the node names."""
    return DiGraphMatcher(expected, actual, node_match=_node_match, edge_match=_edge_match).is_isomorphic()
