"""A calibrated DAM profile: per attention module and query head, the mean attention map at the pattern capture
length and the patterns DAM derives from it; saved as one safetensors file.

File format (``FORMAT``, version ``VERSION``): a safetensors file whose metadata holds ``format``, ``version``,
``pcl``, ``box_cox_lambda``, ``tau``, ``mu``, ``samples``, ``model_fingerprint`` and ``modules`` (a JSON list
of ``{"name", "heads", "is_causal"}``, names being qualified module names such as ``model.layers.3.self_attn``),
and, per module ``<name>``, the tensors ``<name>/mean_attention`` (float32 ``[H, P, P]``),
``<name>/diagonals`` and ``<name>/columns`` (int32, padded with ``PATTERN_PAD``) and ``<name>/true_mask``
(uint8 ``[H, P, P]``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from .kernels.dam_patterns import HeadPatterns, match_patterns, true_mask
from .kernels.pattern_plan import pattern_block_tables
from .kernels.structured_plans import causal_block_tables

FORMAT = "dam-compile-profile"
VERSION = 1

# HF config fields that fix the attention layout; anything else (paths, dtypes, generation flags) may differ.
_STRUCTURAL_CONFIG_KEYS = (
    "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "vocab_size", "rope_theta", "rope_scaling", "max_position_embeddings", "n_embd",
    "n_layer", "n_head", "sliding_window",
)


class ProfileMismatchError(ValueError):
    """A profile used with a model (or graph) it was not calibrated for."""


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
    """One attention module: ``mean_attention`` float32 ``[H, P, P]`` and the DAM patterns derived from it."""

    mean_attention: Tensor
    patterns: HeadPatterns
    is_causal: bool

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
        """Derive every module's patterns (Box-Cox, threshold, match) from its mean attention map."""
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
        """The same captured maps with other DAM thresholds (no recapture)."""
        return DAMProfile.from_mean_attention(
            {n: m.mean_attention for n, m in self.modules.items()},
            {n: m.is_causal for n, m in self.modules.items()},
            box_cox_lambda=self.box_cox_lambda if box_cox_lambda is None else box_cox_lambda,
            tau=self.tau if tau is None else tau, mu=self.mu if mu is None else mu,
            model_fingerprint=self.model_fingerprint, samples=self.samples,
        )

    def patterns_on(self, name: str, device: torch.device | str) -> HeadPatterns:
        """``name``'s patterns on ``device`` (copied once per device and kept)."""
        key = (name, str(device))
        if key not in self._device_cache:
            self._device_cache[key] = self.modules[name].patterns.to(device)
        return self._device_cache[key]

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

    def block_density(self, length: int, block_size: int = 128) -> dict[str, Tensor]:
        """Per module, float ``[H]``: kept blocks over causal-visible blocks of the extended plan at ``length``."""
        densities = {}
        for name, module in self.modules.items():
            p = module.patterns
            partial, full = pattern_block_tables(
                p.diagonals, p.columns, p.corner, length, length, block_size, module.is_causal
            )
            visible, _ = causal_block_tables(length, length, block_size, module.is_causal)
            densities[name] = (partial | full)[0].sum((-2, -1)).to(torch.float32) / visible.sum()
        return densities

    def save(self, path: str | os.PathLike) -> Path:
        """Write the profile as one safetensors file (see the module docstring); returns the path."""
        from safetensors.torch import save_file

        tensors, listed = {}, []
        for name, module in self.modules.items():
            tensors[f"{name}/mean_attention"] = module.mean_attention.contiguous()
            tensors[f"{name}/diagonals"] = module.patterns.diagonals.contiguous()
            tensors[f"{name}/columns"] = module.patterns.columns.contiguous()
            tensors[f"{name}/true_mask"] = module.patterns.corner.to(torch.uint8).contiguous()
            listed.append({"name": name, "heads": module.heads, "is_causal": module.is_causal})
        metadata = {
            "format": FORMAT, "version": str(VERSION), "pcl": str(self.pcl),
            "box_cox_lambda": repr(self.box_cox_lambda), "tau": repr(self.tau), "mu": repr(self.mu),
            "samples": str(self.samples), "model_fingerprint": self.model_fingerprint,
            "modules": json.dumps(listed),
        }
        path = Path(path)
        save_file(tensors, str(path), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model: torch.nn.Module | None = None) -> "DAMProfile":
        """Read a profile written by :meth:`save`; with ``model``, also check it was calibrated for it."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"profile file {str(path)!r} does not exist")
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as err:
            raise ValueError(f"{str(path)!r} is not a DAM profile (not a safetensors file: {err})") from err
        with handle as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{str(path)!r} is not a DAM profile (format {meta.get('format')!r})")
            if int(meta.get("version", -1)) != VERSION:
                raise ValueError(f"{str(path)!r} has profile version {meta.get('version')}; this build reads {VERSION}")
            modules = {}
            for entry in json.loads(meta["modules"]):
                name = entry["name"]
                patterns = HeadPatterns(
                    f.get_tensor(f"{name}/diagonals"), f.get_tensor(f"{name}/columns"),
                    f.get_tensor(f"{name}/true_mask").bool(),
                )
                modules[name] = ModuleProfile(f.get_tensor(f"{name}/mean_attention"), patterns, entry["is_causal"])
        profile = cls(
            modules, int(meta["pcl"]), float(meta["box_cox_lambda"]), float(meta["tau"]), float(meta["mu"]),
            meta["model_fingerprint"], int(meta["samples"]),
        )
        if model is not None:
            profile.check_model(model)
        return profile

    def plot(self, directory: str | os.PathLike, *, length: int | None = None, block_size: int = 128) -> list[Path]:
        """PNG heatmaps (needs the ``viz`` extra): per module the Box-Cox map, true mask and extended mask of
        every head, and a density grid (modules x heads) at ``length`` (default ``16 * pcl``). Returns the files."""
        from .visuals import plot_profile

        return plot_profile(self, Path(directory), length=length or 16 * self.pcl, block_size=block_size)


def as_profile(value: "DAMProfile | str | os.PathLike") -> DAMProfile:
    """A profile from a :class:`DAMProfile` or a path to a saved one (the ``profile`` option's two forms)."""
    if isinstance(value, DAMProfile):
        return value
    if isinstance(value, (str, os.PathLike)):
        return DAMProfile.load(value)
    raise ValueError(f"profile must be a DAMProfile or a path to a saved one, got {type(value).__name__}")
