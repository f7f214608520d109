"""A causal-and-padding mask's key padding, read once per graph for every site that shares the mask.

HuggingFace builds one mask per forward and hands it to every layer. Where :mod:`.causal_mask` reads it as
``is_causal`` plus its last row, this step inserts that row and one ``dam::key_padding`` call on it, right
after the mask, and every site of the mask reads the same three nodes: the row, the per-sequence key ranges and
the kind of padding (all valid, runs, holes). The op synchronises once per forward to learn the kind; each
attention call then takes the cheapest exact description (plain causal when every key is valid).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import Node

from dam_compile.ops import key_padding as _key_padding  # noqa: F401  (registers torch.ops.dam.key_padding)
from .causal_mask import key_padding_row
from .decide import example_value

KEY_PADDING = torch.ops.dam.key_padding.default


@dataclass(frozen=True)
class KeyPaddingNodes:
    """The shared nodes of one mask: ``row`` (``mask[:, :, -1:, :]``), ``call`` (``dam::key_padding(row)``),
    ``kv_range`` and ``kind`` (its two outputs), all placed just after the mask."""

    mask: Node
    row: Node
    call: Node
    kv_range: Node
    kind: Node

    def roles(self) -> dict[Node, str]:
        """Each node's name in the structural check: the same for every site that shares them."""
        stem = f"{self.mask.name}/key_padding"
        return {self.row: f"{stem}.row", self.call: f"{stem}.call", self.kv_range: f"{stem}.kv_range",
                self.kind: f"{stem}.kind"}


def insert_key_padding(mask: Node) -> KeyPaddingNodes:
    """The row of ``mask`` and its ``dam::key_padding`` description, inserted just after ``mask``."""
    graph = mask.graph
    row = key_padding_row(mask)
    with graph.inserting_after(row):
        call = graph.call_function(KEY_PADDING, (row,))
    with graph.inserting_after(call):
        kv_range = graph.call_function(operator.getitem, (call, 0))
    with graph.inserting_after(kv_range):
        kind = graph.call_function(operator.getitem, (call, 1))
    fake_row = example_value(row)
    if isinstance(fake_row, torch._subclasses.FakeTensor):
        with fake_row.fake_mode:
            values = KEY_PADDING(fake_row)
        call.meta["example_value"] = values
        kv_range.meta["example_value"], kind.meta["example_value"] = values
    for node in (call, kv_range, kind):
        node.meta.update({k: v for k, v in row.meta.items() if k in ("stack_trace", "nn_module_stack")})
    return KeyPaddingNodes(mask, row, call, kv_range, kind)
