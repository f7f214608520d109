"""The fidelity stand-in's trained weights as small safetensors shards, so they travel between machines.

A device machine returns files of a limited size and a flat folder, so the weights go to
``<stem>-00001-of-00003.safetensors`` ... (each under :data:`SHARD_LIMIT` bytes, names of letters, digits and
``._-`` only, no subfolders) beside ``<stem>.json``, what was trained and how well it did. The stem carries the
recipe's hash, so a folder can hold the weights of several recipes (seeds) at once.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from torch import Tensor

SHARD_LIMIT = 15 * 2**20  # bytes a returned file may have
HEADER_ROOM = 2**20  # kept free in each shard for the safetensors header (names, shapes, offsets)
SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def shard_groups(state: dict[str, Tensor], budget: int = SHARD_LIMIT - HEADER_ROOM) -> list[dict[str, Tensor]]:
    """``state`` split into groups of tensors of at most ``budget`` bytes each, in name order."""
    groups: list[dict[str, Tensor]] = [{}]
    used = 0
    for name in sorted(state):
        size = state[name].numel() * state[name].element_size()
        if size > budget:
            raise ValueError(f"{name} has {size} bytes, more than one shard may hold ({budget})")
        if used + size > budget and groups[-1]:
            groups.append({})
            used = 0
        groups[-1][name] = state[name]
        used += size
    return groups


def shard_name(stem: str, index: int, count: int) -> str:
    return f"{stem}-{index + 1:05d}-of-{count:05d}.safetensors"


def save_weights(state: dict[str, Tensor], info: dict, directory: Path, stem: str) -> list[Path]:
    """Write ``state`` as shards and ``info`` as ``<stem>.json`` (last, so a folder holding the JSON holds
    every shard); older shards of ``stem`` are removed first. Returns the files written."""
    from safetensors.torch import save_file

    if not SAFE_NAME.match(stem):
        raise ValueError(f"stem {stem!r}: use letters, digits and ._- only")
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob(f"{stem}-*-of-*.safetensors"):
        old.unlink()
    groups = shard_groups({k: v.detach().contiguous().clone() for k, v in state.items()})
    written = []
    for i, group in enumerate(groups):
        path = directory / shard_name(stem, i, len(groups))
        save_file(group, str(path))
        if path.stat().st_size >= SHARD_LIMIT:
            raise RuntimeError(f"{path} came out at {path.stat().st_size} bytes, over {SHARD_LIMIT}")
        written.append(path)
    meta = directory / f"{stem}.json"
    meta.write_text(json.dumps(dict(info, shards=[p.name for p in written]), indent=2, default=str) + "\n")
    return [*written, meta]


def load_weights(directory: Path, stem: str, device: str) -> tuple[dict[str, Tensor], dict] | None:
    """``(state, info)`` saved under ``stem``, or ``None`` when the folder lacks its JSON or any shard."""
    from safetensors.torch import load_file

    meta = directory / f"{stem}.json"
    if not meta.is_file():
        return None
    info = json.loads(meta.read_text())
    paths = [directory / name for name in info.get("shards", [])]
    if not paths or not all(p.is_file() for p in paths):
        return None
    state: dict[str, Tensor] = {}
    for path in paths:
        state.update(load_file(str(path), device=device))
    return state, info
