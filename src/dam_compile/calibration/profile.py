"""A calibrated DAM profile: per attention module and query head, the mean attention map at the pattern capture
length, the patterns DAM derives from it, and which heads run the dynamic plan instead (retrieval heads, found
by :func:`dam_compile.calibrate` on held-out samples); saved as one safetensors file (:mod:`.profile_file`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from dam_compile.plan.dam_patterns import HeadPatterns, match_patterns, true_mask
from dam_compile.plan.pattern_plan import pattern_block_tables
from dam_compile.plan.structured_plans import causal_block_tables
from dam_compile.passes.profile_protocol import ProfileMismatchError
from dam_compile.plan.defaults import DEFAULT_BLOCK_SIZE


# HF config fields that fix the attention layout; anything else (paths, dtypes, generation flags) may differ.
_STRUCTURAL_CONFIG_KEYS = (
    "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "vocab_size", "rope_theta", "rope_scaling", "max_position_embeddings", "n_embd",
    "n_layer", "n_head", "sliding_window",
)


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of what makes a profile fit a model: the class and, for HuggingFace models, the
    structural config fields; otherwise the parameter names and shapes."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        values = config.to_dict()
        described: Any = {k: values.get(k) for k in _STRUCTURAL_CONFIG_KEYS if k in values}
    else:
        described = [(name, list(p.shape)) for name, p in model.named_parameters()]
    text = json.dumps([type(model).__name__, described], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True, eq=False)
class ModuleProfile:
    """One attention module: ``mean_attention`` float32 ``[H, P, P]`` and the DAM patterns derived from it;
    ``dynamic_heads`` bool ``[H]``: heads that run the dynamic plan (default none); ``holdout_recall`` float32
    ``[H]``: the share of each head's attention its extended pattern kept on the held-out samples (NaN: not
    measured)."""

    mean_attention: Tensor
    patterns: HeadPatterns
    is_causal: bool
    dynamic_heads: Tensor | None = None
    holdout_recall: Tensor | None = None

    def __post_init__(self) -> None:
        heads = self.heads
        dynamic = torch.zeros(heads, dtype=torch.bool) if self.dynamic_heads is None else self.dynamic_heads
        recall = torch.full((heads,), math.nan) if self.holdout_recall is None else self.holdout_recall
        for name, value in (("dynamic_heads", dynamic), ("holdout_recall", recall)):
            if not isinstance(value, Tensor) or tuple(value.shape) != (heads,):
                raise ValueError(f"{name} must be a [{heads}] tensor (one entry per query head), got "
                                 f"{tuple(getattr(value, 'shape', ())) or type(value).__name__}")
        object.__setattr__(self, "dynamic_heads", dynamic.detach().to("cpu", torch.bool))
        object.__setattr__(self, "holdout_recall", recall.detach().to("cpu", torch.float32))

    @property
    def heads(self) -> int:
        return self.mean_attention.shape[0]


@dataclass(frozen=True, eq=False)
class DAMProfile:
    """Calibrated DAM patterns of a model, keyed by attention-module qualified name.

    Build one with :func:`dam_compile.calibrate`, use it with
    ``torch.compile(m, backend="dam", options={"profile": profile_or_path})``."""

    modules: Mapping[str, ModuleProfile]
    pcl: int
    box_cox_lambda: float
    tau: float
    mu: float
    model_fingerprint: str
    samples: int = 0
    min_recall: float | None = None  # the threshold that chose the dynamic heads (None: none chosen)
    holdout_samples: int = 0
    head_shard: tuple[int, int] | None = None  # (rank, world_size) of a tensor-parallel slice; None: every head
    _device_cache: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_mean_attention(
        cls,
        mean_attention: Mapping[str, Tensor],
        causal: Mapping[str, bool],
        *,
        box_cox_lambda: float,
        tau: float,
        mu: float,
        model_fingerprint: str,
        samples: int,
    ) -> "DAMProfile":
        """Derive every module's patterns (Box-Cox, threshold, match) from its mean attention map (no dynamic
        heads: :meth:`with_dynamic_heads` adds them)."""
        if not mean_attention:
            raise ValueError("mean_attention is empty: no attention module was captured")
        pcls = {m.shape[-1] for m in mean_attention.values()}
        if len(pcls) != 1:
            raise ValueError(f"every mean attention map must share one PCL, got {sorted(pcls)}")
        modules = {}
        for name, mean in mean_attention.items():
            mean = mean.detach().to("cpu", torch.float32)
            mask = true_mask(mean, box_cox_lambda, tau)
            modules[name] = ModuleProfile(mean, match_patterns(mask, mu, causal[name]), causal[name])
        return cls(modules, pcls.pop(), box_cox_lambda, tau, mu, model_fingerprint, samples)

    def rethreshold(self, *, tau: float | None = None, mu: float | None = None,
                    box_cox_lambda: float | None = None) -> "DAMProfile":
        """The same captured maps with other DAM thresholds (no recapture); the dynamic heads stay as they are
        (their held-out recall was measured with the old patterns)."""
        fresh = DAMProfile.from_mean_attention(
            {n: m.mean_attention for n, m in self.modules.items()},
            {n: m.is_causal for n, m in self.modules.items()},
            box_cox_lambda=self.box_cox_lambda if box_cox_lambda is None else box_cox_lambda,
            tau=self.tau if tau is None else tau, mu=self.mu if mu is None else mu,
            model_fingerprint=self.model_fingerprint, samples=self.samples,
        )
        return fresh.with_dynamic_heads(
            {n: m.dynamic_heads for n, m in self.modules.items()},
            holdout_recall={n: m.holdout_recall for n, m in self.modules.items()},
            min_recall=self.min_recall, holdout_samples=self.holdout_samples,
        )

    def with_dynamic_heads(
        self,
        dynamic_heads: Mapping[str, Tensor | Sequence[int]],
        *,
        holdout_recall: Mapping[str, Tensor] | None = None,
        min_recall: float | None = None,
        holdout_samples: int = 0,
    ) -> "DAMProfile":
        """A copy whose listed modules run the given heads dynamic (a bool ``[H]`` tensor or head indices per
        module name; modules not listed keep theirs), e.g. to mark retrieval heads known from elsewhere.
        ``holdout_recall`` (float ``[H]`` per module; modules not listed keep theirs), ``min_recall`` and
        ``holdout_samples`` record how they were chosen."""
        recall = holdout_recall or {}
        for label, given in (("dynamic_heads", dynamic_heads), ("holdout_recall", recall)):
            unknown = sorted(set(given) - set(self.modules))
            if unknown:
                raise ValueError(f"{label} names modules this profile lacks: {', '.join(unknown[:3])}")
        modules = dict(self.modules)
        for name in set(dynamic_heads) | set(recall):
            module = self.modules[name]
            heads = dynamic_heads.get(name)
            modules[name] = dataclasses.replace(
                module, dynamic_heads=module.dynamic_heads if heads is None else _head_mask(heads, module.heads, name),
                holdout_recall=recall.get(name, module.holdout_recall),
            )
        return dataclasses.replace(self, modules=modules, min_recall=min_recall, holdout_samples=holdout_samples,
                                   _device_cache={})

    def shard_heads(self, rank: int, world_size: int) -> "DAMProfile":
        """The profile a tensor-parallel rank's graph needs: every module's heads ``[rank * H / world_size,
        (rank + 1) * H / world_size)``, the contiguous slice that column-wise sharding of the query projection
        gives rank ``rank`` (HuggingFace's ``tp_plan="auto"``, PyTorch's ``ColwiseParallel``). The backend
        takes it on its own when the default process group is the tensor-parallel group; pass this for another
        mesh, with the rank in the tensor-parallel dimension."""
        if self.head_shard is not None:
            raise ValueError(f"this profile is already rank {self.head_shard[0]}'s slice of {self.head_shard[1]}; "
                             "shard the whole profile")
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
        uneven = sorted(n for n, m in self.modules.items() if m.heads % world_size)
        if uneven:
            raise ValueError(f"world_size={world_size} does not divide the query heads of {', '.join(uneven[:3])} "
                             f"({self.modules[uneven[0]].heads})")
        modules = {}
        for name, m in self.modules.items():
            part = slice(rank * m.heads // world_size, (rank + 1) * m.heads // world_size)
            patterns = HeadPatterns(m.patterns.diagonals[part], m.patterns.columns[part], m.patterns.corner[part])
            modules[name] = ModuleProfile(m.mean_attention[part], patterns, m.is_causal, m.dynamic_heads[part],
                                          m.holdout_recall[part])
        return dataclasses.replace(self, modules=modules, head_shard=(rank, world_size), _device_cache={})

    def dynamic_summary(self) -> dict[str, Any]:
        """``{"dynamic_heads": {module: [heads]} (modules that have any), "dynamic_head_count": "k of N"}``."""
        lists = {n: m.dynamic_heads.nonzero().flatten().tolist() for n, m in self.modules.items()}
        total = sum(m.heads for m in self.modules.values())
        count = sum(len(v) for v in lists.values())
        return {"dynamic_heads": {n: v for n, v in lists.items() if v}, "dynamic_head_count": f"{count} of {total}"}

    def patterns_on(self, name: str, device: torch.device | str) -> HeadPatterns:
        """``name``'s patterns on ``device`` (copied once per device and kept)."""
        key = (name, str(device))
        if key not in self._device_cache:
            self._device_cache[key] = self.modules[name].patterns.to(device)
        return self._device_cache[key]

    def patterns_for(self, path: str, device: torch.device | str) -> tuple[HeadPatterns, Tensor]:
        """The patterns and dynamic heads (bool ``[H]``) on ``device`` of the entry for a module path
        (:meth:`find_module`); raises ``ValueError`` naming the path when the profile has none."""
        entry = self.find_module(path)
        if entry is None:
            raise ValueError(f"the profile has no entry for module {path!r}")
        return self.patterns_on(entry, device), self.modules[entry].dynamic_heads.to(device)

    def find_module(self, path: str) -> str | None:
        """The profile's entry for a graph's module path: the same name, or the one entry that ends with it
        or that it ends with (a model compiled from a submodule, or a wrapper around the calibrated model)."""
        if path in self.modules:
            return path
        matches = [n for n in self.modules if n.endswith("." + path) or path.endswith("." + n)]
        return matches[0] if len(matches) == 1 else None

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise :class:`ProfileMismatchError` unless ``model`` has the fingerprint this profile was made on."""
        found = model_fingerprint(model)
        if found != self.model_fingerprint:
            raise ProfileMismatchError(
                f"this DAM profile was calibrated on a model with fingerprint {self.model_fingerprint}, but "
                f"{type(model).__name__} has {found} (another architecture or size); calibrate it for this model"
            )

    def block_density(self, length: int, block_size: int = DEFAULT_BLOCK_SIZE) -> dict[str, Tensor]:
        """Per module, float ``[H]``: kept blocks over causal-visible blocks of the extended plan at ``length``
        (of the patterns: a dynamic head's density depends on the input, at most the backend's ``density``)."""
        densities = {}
        for name, module in self.modules.items():
            p = module.patterns
            partial, full = pattern_block_tables(
                p.diagonals, p.columns, p.corner, length, length, block_size, module.is_causal
            )
            visible, _ = causal_block_tables(length, length, block_size, module.is_causal)
            densities[name] = (partial | full)[0].sum((-2, -1)).to(torch.float32) / visible.sum()
        return densities


def _head_mask(heads: Tensor | Sequence[int], count: int, module: str) -> Tensor:
    """bool ``[count]`` from a bool tensor or a sequence of head indices (``dynamic_heads`` of ``module``)."""
    if isinstance(heads, Tensor):
        if heads.dtype != torch.bool:
            raise ValueError(f"dynamic_heads of {module}: a tensor must be bool [{count}], got {heads.dtype}; "
                             "pass head indices as a list")
        mask = heads
    else:
        index = torch.as_tensor(list(heads), dtype=torch.int64)
        if index.numel() and (index.min() < 0 or index.max() >= count):
            raise ValueError(f"dynamic_heads of {module}: head indices must lie in [0, {count}), got {index.tolist()}")
        mask = torch.zeros(count, dtype=torch.bool).index_fill(0, index, True)
    if tuple(mask.shape) != (count,):
        raise ValueError(f"dynamic_heads of {module} must have {count} entries (query heads), got {tuple(mask.shape)}")
    return mask
