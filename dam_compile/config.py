"""Every knob of the ``dam`` backend, in one frozen dataclass with documented defaults."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from typing import Any, Mapping

from .kernels.dispatch import KERNELS

MASK_SOURCES = ("dense", "streaming")
INNER_BACKENDS = ("inductor", "eager", "aot_eager")
DUMP_DIR_ENV = "DAM_DUMP_DIR"


@dataclass(frozen=True)
class DAMConfig:
    """Options of the ``dam`` backend; pass them as ``torch.compile(m, backend="dam", options={...})`` or
    ``dam_compile.backend(**options)``.

    Attributes:
        block_size: tokens per query and key block of the sparse plan (a power of two, 16 to 256).
        min_seq_len: query lengths below this run dense attention, chosen at run time without a recompile.
        mask_source: where each attention's plan comes from: ``"dense"`` (every visible block: identical to
            full attention) or ``"streaming"`` (``sink_blocks`` + a window of ``local_blocks``: the
            StreamingLLM baseline).
        tau: DAM threshold on the shifted Box-Cox map (read by the DAM mask sources).
        box_cox_lambda: DAM's Box-Cox lambda (read by the DAM mask sources).
        sink_blocks: leading key blocks every query keeps.
        local_blocks: key blocks up to and including the diagonal that every query keeps.
        kernel: ``"auto"`` (the fastest exact path this build has for the device; dense SDPA where it has
            no sparse kernel) or ``"reference"`` (the PyTorch block-sparse reference on any device; slow).
        inner_backend: what compiles the rewritten graph: ``"inductor"``, ``"aot_eager"`` or ``"eager"``.
        dump_dir: write each graph before/after the pass and a table of its attention sites here; defaults
            to the ``DAM_DUMP_DIR`` environment variable.
        strict: raise when the pass fails instead of compiling the unmodified graph with a warning.
    """

    block_size: int = 128
    min_seq_len: int = 4096
    mask_source: str = "dense"
    tau: float = 0.3
    box_cox_lambda: float = 0.5
    sink_blocks: int = 1
    local_blocks: int = 2
    kernel: str = "auto"
    inner_backend: str = "inductor"
    dump_dir: str | None = None
    strict: bool = False

    def __post_init__(self) -> None:
        _require_int("block_size", self.block_size, minimum=16)
        if self.block_size > 256 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two from 16 to 256, got {self.block_size}")
        _require_int("min_seq_len", self.min_seq_len, minimum=0)
        _require_int("sink_blocks", self.sink_blocks, minimum=0)
        _require_int("local_blocks", self.local_blocks, minimum=1)
        _require_choice("mask_source", self.mask_source, MASK_SOURCES)
        _require_choice("kernel", self.kernel, KERNELS)
        _require_choice("inner_backend", self.inner_backend, INNER_BACKENDS)
        _require_number("tau", self.tau)
        _require_number("box_cox_lambda", self.box_cox_lambda)
        if not isinstance(self.strict, bool):
            raise ValueError(f"strict must be a bool, got {self.strict!r}")
        if self.dump_dir is not None and not isinstance(self.dump_dir, (str, os.PathLike)):
            raise ValueError(f"dump_dir must be a path or None, got {self.dump_dir!r}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None) -> "DAMConfig":
        """Build a config from ``torch.compile`` options; unknown names raise ``ValueError`` listing the valid
        ones. ``dump_dir`` falls back to ``$DAM_DUMP_DIR``."""
        return cls().replace(options or {})

    def replace(self, options: Mapping[str, Any]) -> "DAMConfig":
        """A copy with ``options`` applied (validated like :meth:`from_options`)."""
        if not isinstance(options, Mapping):
            raise ValueError(f"options must be a dict of option names to values, got {type(options).__name__}")
        unknown = sorted(set(options) - option_names())
        if unknown:
            raise ValueError(
                f"unknown dam option(s) {', '.join(map(repr, unknown))}; valid options: "
                f"{', '.join(sorted(option_names()))}"
            )
        merged = dataclasses.replace(self, **options)
        if merged.dump_dir is None and os.environ.get(DUMP_DIR_ENV):
            merged = dataclasses.replace(merged, dump_dir=os.environ[DUMP_DIR_ENV])
        return merged


def option_names() -> set[str]:
    return {f.name for f in fields(DAMConfig)}


def _require_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _require_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")


def _require_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
