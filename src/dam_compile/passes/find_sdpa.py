"""Step (a): find every scaled-dot-product-attention node of a Dynamo FX graph and read its arguments."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import Graph, Node

SDPA_TARGETS: frozenset[Any] = frozenset(
    {
        torch._C._nn.scaled_dot_product_attention,
        F.scaled_dot_product_attention,
        torch.ops.aten.scaled_dot_product_attention.default,
    }
)

# SDPA's signature; the aten overload takes scale and enable_gqa keyword-only but in the same order.
_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


@dataclass
class SDPASite:
    """One attention call in the graph, its arguments by name (graph nodes or constants)."""

    node: Node
    query: Node
    key: Node
    value: Node
    attn_mask: Any
    dropout_p: Any
    is_causal: Any
    scale: Any
    enable_gqa: Any
    module_path: str
    source: str


def is_sdpa(node: Node) -> bool:
    return node.op == "call_function" and node.target in SDPA_TARGETS


def find_sdpa_sites(graph: Graph) -> list[SDPASite]:
    """Every SDPA call in ``graph``, in graph order."""
    return [read_site(node) for node in graph.nodes if is_sdpa(node)]


def bind_sdpa_args(args: tuple, kwargs: dict) -> dict[str, Any]:
    """SDPA's arguments by name, defaults filled in."""
    bound = dict(_DEFAULTS)
    bound.update(zip(_PARAMS, args))
    bound.update(kwargs)
    return bound


def read_site(node: Node) -> SDPASite:
    bound = bind_sdpa_args(node.args, node.kwargs)
    return SDPASite(
        node=node,
        **{name: bound[name] for name in _PARAMS},
        module_path=module_path(node),
        source=source_location(node),
    )


# One step of a Dynamo source name: ``L['self']`` / ``G['model']`` (a frame variable), ``.attr``, ``[0]`` or ``['key']``.
_STEP = re.compile(r"""(?P<frame>^[LG]\[(['"]).*?\2\])|\.(?P<attr>\w+)|\[(?P<index>-?\d+)\]|\[(['"])(?P<key>.*?)\5\]""")
_ROOT_STEPS = {"__self__"}  # a bound method's module: still the root
_CONTAINER_STEPS = {"_modules"}  # ``._modules['layers']`` spells out the child ``layers``


def module_path(node: Node) -> str:
    """Qualified name of the innermost ``nn.Module`` that made ``node``, as the compiled model's own
    ``named_modules()`` spells it (``model.layers.3.self_attn``); ``""`` at top level."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _module_type = list(stack.values())[-1]
    return normalize_module_path(str(path))


def normalize_module_path(path: str) -> str:
    """A Dynamo source name made relative to the compiled root module: ``L['self'].model.layers[3]['attn']`` ->
    ``model.layers.3.attn``. The root is the frame variable with any subscripts and ``__self__`` that follow it
    before the first attribute: ``L['self']``, ``G['model']``, or ``L['args'][0]`` when a decorator with
    ``*args`` wraps ``forward`` (transformers 5.24). A name that is no source (already a path) is kept."""
    steps, at = [], 0
    for match in _STEP.finditer(path):
        if match.start() != at:
            break
        at = match.end()
        steps.append(match)
    if at != len(path) or not steps or steps[0].group("frame") is None:  # no source name: a dotted path
        return ".".join(part for part in re.split(r"[.\[\]'\"]+", path) if part)
    names, rooted = [], True
    for match in steps[1:]:
        attr = match.group("attr")
        if rooted and (attr is None or attr in _ROOT_STEPS):
            continue  # still naming the root: args[0], a list item, a bound method's __self__
        rooted = False
        if attr not in _CONTAINER_STEPS:
            names.append(attr if attr is not None else match.group("index") or match.group("key"))
    return ".".join(names)


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def source_location(node: Node) -> str:
    """``file:line in function`` of the user code that made ``node`` (innermost frame), or ``""``."""
    frames = _FRAME.findall(node.meta.get("stack_trace") or "")
    if not frames:
        return ""
    file, line, func = frames[-1]
    return f"{file}:{line} in {func}"
