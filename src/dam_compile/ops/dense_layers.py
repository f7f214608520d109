"""Which attention sites stay dense at every length: those of the model's first ``dense_layers`` layers.

A trained model's first layer attends broadly (it builds the position and neighbour features that every later
layer reads), so the mass its sparse plan drops is spread over many keys that later layers still need. Measured
here: on the fidelity stand-in a 32K passkey is lost through layer 0's prefill plan alone, and kept when only
that layer runs dense. Quest keeps its first two layers dense for the same reason.
"""

from __future__ import annotations

import re

_INTEGER_STEP = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")


def layer_index(module_path: str) -> int | None:
    """The layer an attention module belongs to: the first integer step of its path (``model.layers.3.self_attn``
    -> 3, ``transformer.h.0.attn`` -> 0, ``bert.encoder.layer.2.attention.self`` -> 2); ``None`` when the path
    has no integer step (an attention module compiled on its own, a model without a layer list)."""
    match = _INTEGER_STEP.search(module_path)
    return None if match is None else int(match.group(1))


def dense_layer_reason(module_path: str, dense_layers: int) -> str | None:
    """Why the site at ``module_path`` runs dense whatever its length, or ``None`` when its plan is used."""
    index = layer_index(module_path)
    if index is None or index >= dense_layers:
        return None
    return (f"layer {index} is one of the first dense_layers={dense_layers}: full attention at every length "
            "(the op's dense path, SDPA)")
