"""Decide a decode step's path when its graph compiles, not on every token.

A decode step's attention is a few microseconds of GPU work, so what it costs is host time: a dense decode step
that goes through our ops (a plan op that plans nothing, then the op's run-time choice, then SDPA) costs two
Python calls per layer per token more than the model's own SDPA call, which Inductor runs directly. So a decode
site whose every call this graph can see would run dense is left as the model's SDPA call: the graph is then
the one plain ``torch.compile`` builds, and CUDA graphs capture it the same way.

The per-call policy (:func:`dam_compile.ops.dispatch.call_path`) is evaluated on the site's example tensors.
Where the key length is symbolic, comparing it with ``min_seq_len`` or the crossover adds a Dynamo guard
(``kv_len < limit``): the graph serves every cache below the limit, and a cache that grows past it compiles a
sparse decode graph once. Prefill keeps its run-time choice: its host time hides behind the GPU work.
"""

from __future__ import annotations

import torch

from dam_compile.ops.dispatch import PathOptions, call_path
from .decide import example_value
from .find_sdpa import SDPASite
from .insert_mask import is_decode


def dense_decode_reason(site: SDPASite, options: PathOptions) -> str | None:
    """Why every call of the decode ``site`` runs dense (and the site should stay the model's SDPA call), or
    ``None`` for a prefill site or a decode site that runs sparse at its sizes. May add a size guard."""
    if not is_decode(site):
        return None
    query, key = example_value(site.query), example_value(site.key)
    if not isinstance(query, torch.Tensor) or not isinstance(key, torch.Tensor):
        return None
    path, reason = call_path(options, site.module_path, query, key)
    if path != "dense":
        return None
    return (f"{reason}; decided when compiled, so the model's own SDPA call stays (a longer KV cache compiles "
            "a sparse decode graph once)")
