"""A calibrated profile on a tensor-parallel rank: the rank's graph sees its slice of the query heads.

Column-wise sharding of the query projection (HuggingFace's ``tp_plan="auto"``, PyTorch's ``ColwiseParallel``)
gives rank ``r`` of ``n`` the contiguous heads ``[r * H / n, (r + 1) * H / n)``. A profile calibrated on the
whole model has ``H`` heads per module, so on such a rank it is sliced the same way before the pass reads it.
"""

from __future__ import annotations

import logging

import torch
from torch.fx import GraphModule

from .passes.decide import example_value
from .passes.find_sdpa import find_sdpa_sites
from .calibration.profile import DAMProfile

log = logging.getLogger("dam_compile")


def tensor_parallel_rank() -> tuple[int, int] | None:
    """``(rank, world_size)`` of the default process group when one is running with more than one rank."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return dist.get_rank(), dist.get_world_size()


def profile_for_graph(profile: DAMProfile | None, gm: GraphModule) -> DAMProfile | None:
    """``profile`` as ``gm``'s attention needs it: unchanged when its head counts are the graph's, the running
    rank's head slice (:meth:`DAMProfile.shard_heads`) when every attention site the profile knows has
    ``1 / world_size`` of the profile's heads, as on a tensor-parallel rank. In any other case it is returned
    unchanged and the pass names the mismatch (a 2-D mesh, where the tensor-parallel rank is not the global
    one, needs ``profile.shard_heads(tp_rank, tp_size)`` passed explicitly)."""
    group = tensor_parallel_rank()
    if profile is None or profile.head_shard is not None or group is None:
        return profile
    rank, world = group
    pairs = []
    for site in find_sdpa_sites(gm.graph):
        name = profile.find_module(site.module_path) if site.module_path else None
        query = example_value(site.query)
        if name is not None and isinstance(query, torch.Tensor) and query.dim() == 4:
            pairs.append((profile.modules[name].heads, query.shape[1]))
    if not pairs or not all(isinstance(local, int) and whole == local * world for whole, local in pairs):
        return profile
    log.info("dam: rank %d of %d: the profile's heads sliced to this rank's %d per module", rank, world, pairs[0][1])
    return profile.shard_heads(rank, world)
