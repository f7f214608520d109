"""The DAM profile file: one safetensors file, written by :func:`save_profile` and read by :func:`load_profile`.

Format ``FORMAT``, version ``VERSION``. Metadata: ``format``, ``version``, ``pcl``, ``box_cox_lambda``, ``tau``,
``mu``, ``samples``, ``model_fingerprint``, ``min_recall`` (``"none"`` when no heads were chosen dynamic),
``holdout_samples`` and ``modules`` (a JSON list of ``{"name", "heads", "is_causal"}``, names being qualified
module names such as ``model.layers.3.self_attn``). Tensors per module ``<name>``: ``<name>/mean_attention``
(float32 ``[H, P, P]``), ``<name>/diagonals`` and ``<name>/columns`` (int32, padded with ``PATTERN_PAD``),
``<name>/true_mask`` (uint8 ``[H, P, P]``), ``<name>/dynamic_heads`` (uint8 ``[H]``, 1: the head runs the dynamic
plan) and ``<name>/holdout_recall`` (float32 ``[H]``, NaN: not measured).

Version 1 (no ``min_recall``, ``holdout_samples``, ``dynamic_heads`` or ``holdout_recall``) still loads, with no
dynamic heads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from dam_compile.plan.dam_patterns import HeadPatterns
from .profile import DAMProfile, ModuleProfile

FORMAT = "dam-compile-profile"
VERSION = 2
READABLE_VERSIONS = (1, 2)


def save_profile(profile: DAMProfile, path: str | os.PathLike) -> Path:
    """Write ``profile`` to ``path`` as one safetensors file (overwritten); returns the path."""
    if profile.head_shard is not None:
        raise ValueError("a tensor-parallel slice is not saved: save the whole profile (every rank slices it)")
    from safetensors.torch import save_file

    tensors, listed = {}, []
    for name, module in profile.modules.items():
        tensors[f"{name}/mean_attention"] = module.mean_attention.contiguous()
        tensors[f"{name}/diagonals"] = module.patterns.diagonals.contiguous()
        tensors[f"{name}/columns"] = module.patterns.columns.contiguous()
        tensors[f"{name}/true_mask"] = module.patterns.corner.to(torch.uint8).contiguous()
        tensors[f"{name}/dynamic_heads"] = module.dynamic_heads.to(torch.uint8).contiguous()
        tensors[f"{name}/holdout_recall"] = module.holdout_recall.contiguous()
        listed.append({"name": name, "heads": module.heads, "is_causal": module.is_causal})
    metadata = {
        "format": FORMAT, "version": str(VERSION), "pcl": str(profile.pcl),
        "box_cox_lambda": repr(profile.box_cox_lambda), "tau": repr(profile.tau), "mu": repr(profile.mu),
        "samples": str(profile.samples), "model_fingerprint": profile.model_fingerprint,
        "min_recall": "none" if profile.min_recall is None else repr(profile.min_recall),
        "holdout_samples": str(profile.holdout_samples), "modules": json.dumps(listed),
    }
    path = Path(path)
    save_file(tensors, str(path), metadata=metadata)
    return path


def _read_profile(path: str | os.PathLike) -> DAMProfile:
    """Read a profile file of a readable version; raises ``FileNotFoundError`` for a missing file and
    ``ValueError`` naming what is wrong for anything else."""
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
        version = _version(meta.get("version"))
        if version not in READABLE_VERSIONS:
            raise ValueError(f"{str(path)!r} has profile version {meta.get('version')}; this build reads versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))} (a newer dam-compile wrote it?)")
        names = set(f.keys())

        def tensor(key: str) -> Any:
            if key not in names:
                raise ValueError(f"{str(path)!r} lacks the tensor {key!r}: a damaged or incomplete profile")
            return f.get_tensor(key)

        modules = {entry["name"]: _module(entry, tensor, version, path) for entry in json.loads(meta["modules"])}
    min_recall = meta.get("min_recall", "none")
    return DAMProfile(
        modules, int(meta["pcl"]), float(meta["box_cox_lambda"]), float(meta["tau"]), float(meta["mu"]),
        meta["model_fingerprint"], int(meta["samples"]),
        min_recall=None if min_recall == "none" else float(min_recall),
        holdout_samples=int(meta.get("holdout_samples", 0)),
    )


def _module(entry: dict, tensor, version: int, path: Path) -> ModuleProfile:
    name = entry["name"]
    mean = tensor(f"{name}/mean_attention")
    if mean.dim() != 3 or mean.shape[0] != entry["heads"]:
        raise ValueError(f"{str(path)!r}: {name} lists {entry['heads']} heads but its mean_attention is "
                         f"{tuple(mean.shape)}")
    patterns = HeadPatterns(tensor(f"{name}/diagonals"), tensor(f"{name}/columns"), tensor(f"{name}/true_mask").bool())
    if version == 1:
        return ModuleProfile(mean, patterns, entry["is_causal"])
    try:
        return ModuleProfile(mean, patterns, entry["is_causal"], tensor(f"{name}/dynamic_heads").bool(),
                             tensor(f"{name}/holdout_recall"))
    except ValueError as err:
        raise ValueError(f"{str(path)!r}: {name}: {err}") from err


def _version(text: str | None) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


def load_profile(path: str | os.PathLike, model: torch.nn.Module | None = None) -> DAMProfile:
    """Read a profile written by :func:`save_profile` (this version or version 1, which has no dynamic heads);
    with ``model``, also check it was calibrated for it (``ProfileMismatchError`` otherwise)."""
    profile = _read_profile(path)
    if model is not None:
        profile.check_model(model)
    return profile


def as_profile(value: "DAMProfile | str | os.PathLike") -> DAMProfile:
    """A profile from a :class:`DAMProfile` or a path to a saved one (the ``profile`` option's two forms)."""
    if isinstance(value, DAMProfile):
        return value
    if isinstance(value, (str, os.PathLike)):
        return load_profile(value)
    raise ValueError(f"profile must be a DAMProfile or a path to a saved one, got {type(value).__name__}")
