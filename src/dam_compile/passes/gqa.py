"""Read grouped K/V before ``repeat_kv``: HuggingFace models repeat each key/value head for every query head of
its group whenever SDPA gets a mask (padded batches, static caches), which copies the whole KV cache on every
call. The sparse op takes grouped heads itself (``enable_gqa``), so the rewrite reads the K/V it was repeated
from; the copy then has no user and Inductor drops it.

The pattern, as Dynamo records ``x[:, :, None, :, :].expand(b, kvh, rep, n, d).reshape(b, kvh * rep, n, d)``:
``getitem`` adding an axis at dim 2, ``expand`` along it, ``reshape`` merging it into the head axis. Query head
``h`` then reads source head ``h // rep``, which is the op's own GQA rule.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
from torch.fx import Node

from .decide import example_value
from .find_sdpa import SDPASite

_ALL = slice(None, None, None)


def repeated_source(node: Node) -> tuple[Node, int] | None:
    """``(source, repeats)`` when ``node`` is ``repeat_kv(source, repeats)`` as above, else ``None``."""
    if not _is_method(node, ("reshape", "view")):
        return None
    expand = node.args[0]
    if not (isinstance(expand, Node) and _is_method(expand, ("expand",))):
        return None
    item = expand.args[0]
    if not (isinstance(item, Node) and item.op == "call_function" and item.target is operator.getitem):
        return None
    source, index = item.args
    if not isinstance(source, Node) or index != (_ALL, _ALL, None, _ALL, _ALL):
        return None
    src, expanded, out = (example_value(n) for n in (source, expand, node))
    if not all(isinstance(t, torch.Tensor) for t in (src, expanded, out)) or src.dim() != 4 or expanded.dim() != 5:
        return None
    batch, heads, length, dim = src.shape
    repeats = expanded.shape[2]
    if not isinstance(repeats, int) or tuple(out.shape) != (batch, heads * repeats, length, dim):
        return None
    return source, repeats


def read_before_repeat(site: SDPASite) -> SDPASite:
    """``site`` reading key and value before a shared ``repeat_kv`` (with ``enable_gqa=True``), or unchanged."""
    if site.enable_gqa:
        return site
    key, value = repeated_source(site.key), repeated_source(site.value)
    if key is None or value is None or key[1] != value[1]:
        return site
    return dataclasses.replace(site, key=key[0], value=value[0], enable_gqa=True)


def _is_method(node: Node, names: tuple[str, ...]) -> bool:
    return node.op == "call_method" and node.target in names
