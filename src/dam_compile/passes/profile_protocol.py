"""A calibrated profile as the graph passes see it: a :class:`typing.Protocol` (``DAMProfile`` satisfies it; the
passes never import the face package), the lookup of a site's entry, and :class:`ProfileMismatchError`."""

from __future__ import annotations

from typing import Mapping, Protocol

import torch
from torch import Tensor

from dam_compile.plan.dam_patterns import HeadPatterns
from .decide import example_value
from .find_sdpa import SDPASite


class ProfileMismatchError(ValueError):
    """A profile used with a model (or graph) it was not calibrated for."""


class ProfileModule(Protocol):
    """One attention module's entry."""

    @property
    def heads(self) -> int:
        """Query heads ``H``."""

    @property
    def dynamic_heads(self) -> Tensor:
        """bool ``[H]`` (CPU): heads that run the dynamic plan instead of their calibrated patterns."""


class SiteProfile(Protocol):
    """What the passes read from a calibrated profile."""

    @property
    def modules(self) -> Mapping[str, ProfileModule]:
        """Entries keyed by qualified module name."""

    @property
    def pcl(self) -> int:
        """Pattern capture length (the corner of every module's patterns)."""

    def find_module(self, path: str) -> str | None:
        """The entry name for a graph's module path, or ``None``."""

    def patterns_on(self, name: str, device: torch.device | str) -> HeadPatterns:
        """Entry ``name``'s DAM patterns on ``device``."""


def profile_entry(profile: SiteProfile, site: SDPASite) -> str | None:
    """The profile's module name for ``site`` (``None`` when it has none). Raises
    :class:`ProfileMismatchError` when the entry exists but its head count differs from the site's."""
    name = profile.find_module(site.module_path) if site.module_path else None
    if name is None:
        return None
    heads = example_value(site.query).shape[1]
    whole = profile.modules[name].heads
    if whole != heads:
        sliced = isinstance(heads, int) and heads < whole and whole % heads == 0
        raise ProfileMismatchError(
            f"the profile's {name} has {whole} query heads but the graph's attention at {site.module_path} has "
            f"{heads}: " + (f"on a tensor-parallel rank, pass profile.shard_heads(tp_rank, {whole // heads}) (the "
                            "backend slices it itself only when the default process group is the tensor-parallel "
                            "one)" if sliced else "the profile was calibrated for another model")
        )
    return name
