"""Every knob of the ``dam`` backend, in one frozen dataclass with documented defaults."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from typing import Any, Mapping

from .ops.dispatch import KERNELS
from .dynamic.dynamic_plan import DEFAULT_MASS_TARGET
from .dynamic.estimators import DEFAULT_ESTIMATOR, ESTIMATOR_SPECS, ESTIMATORS
from .plan.defaults import (DEFAULT_BLOCK_SIZE, DEFAULT_BOX_COX_LAMBDA, DEFAULT_LOCAL_BLOCKS, DEFAULT_MU,
                            DEFAULT_SINK_BLOCKS, DEFAULT_TAU)
from .plan.mask_options import MASK_SOURCES, MaskOptions
from .calibration.profile_file import as_profile

INNER_BACKENDS = ("inductor", "eager", "aot_eager")
DUMP_DIR_ENV = "DAM_DUMP_DIR"


@dataclass(frozen=True)
class DAMConfig:
    """Options of the ``dam`` backend; pass them as ``torch.compile(m, backend="dam", options={...})`` or
    ``dam_compile.backend(**options)``.

    Attributes:
        block_size: tokens per query and key block of the sparse plan (a power of two, 16 to 256).
        min_seq_len: attention over fewer keys than this (a short prompt, a decode step on a short cache) runs
            dense, and its mask is not computed; chosen at run time without a recompile. Above it, a call too
            small for its plan to pay off on the GPU (``kernels/dispatch.below_crossover``: a measured amount of
            dense attention work, or of K/V bytes a decode step reads) runs dense too; 0 makes every call
            sparse.
        mask_source: where each attention's plan comes from: ``"dynamic"`` (DAM computed per input from the
            attention's own Q and K; the default without a profile), ``"calibrated"`` (the per-head DAM
            patterns of ``profile``; the default with one), ``"dense"`` (every visible block: identical to full
            attention) or ``"streaming"`` (``sink_blocks`` + a window of ``local_blocks``: the StreamingLLM
            baseline).
        profile: a :class:`DAMProfile` or the path of a saved one (from :func:`dam_compile.calibrate`).
        tau: DAM threshold on the shifted Box-Cox map (dynamic mode; a profile carries its own).
        box_cox_lambda: DAM's Box-Cox lambda (dynamic mode).
        mu: DAM's pattern match ratio: a block diagonal or column is kept whole when this fraction of it passed
            the threshold (dynamic mode).
        density: dynamic mode's cap: beyond the always-kept sink and local blocks, a head keeps at most this
            share of its other visible key blocks; a decode step keeps at least this share of its blocks beyond
            sink and local. ``None`` (default): the estimator's own (``dynamic/estimators.py``): no cap for
            ``"sampled"``, whose budgets follow the mass alone (a decode step keeps the blocks holding 0.99 of
            its exact attention), 0.075 for the others.
        mass_target: dynamic mode keeps, per query block, the blocks holding this share of the row's estimated
            attention (within ``density``); 0 keeps only DAM's thresholded blocks. The default 0.99 keeps
            SmolLM2-135M's perplexity on natural text at 0.997-1.001x full attention's at 4K and 8K tokens
            (``benchmarks/results/real_cpu.json``).
        estimator: dynamic mode's block-map estimate: ``"sampled"`` (default: every query block's exact mass
            averaged over every eighth of its queries, the last query block exact), ``"adaptive"`` (per head the
            query-aware pooled estimate or the vertical-slash lines of the last query block's exact attention,
            whichever that exact attention supports), ``"pooled"`` (mean-pooled Q and K blocks) or
            ``"last_block"`` (exact attention of the last query block, as columns and diagonals), the last two
            with a fixed per-row share of ``density``.
        sink_blocks: leading key blocks every query keeps (streaming and dynamic).
        local_blocks: key blocks up to and including the diagonal that every query keeps (streaming, dynamic).
        dense_layers: attention in the model's first this many layers runs dense at every length, whatever the
            source (a layer is the first integer in the attention module's path, ``model.layers.0.self_attn``;
            a path with none is not counted). The first layer's attention is broad, and what its plan drops
            later layers still need: the fidelity bench loses a 32K passkey through layer 0's plan alone. One
            dense layer of a 32-layer model adds a thirty-second of its dense attention time (at 128K on an
            H200 about 0.22 s of the 4.3 s prefill); 0 makes every layer sparse.
        kernel: ``"auto"`` (the fastest exact path this build has for the device; dense SDPA where it has
            no sparse kernel) or ``"reference"`` (the PyTorch block-sparse reference on any device; slow).
        inner_backend: what compiles the rewritten graph: ``"inductor"``, ``"aot_eager"`` or ``"eager"``.
        dump_dir: write each graph before/after the pass and a table of its attention sites here; defaults
            to the ``DAM_DUMP_DIR`` environment variable.
        strict: raise when the pass fails instead of compiling the unmodified graph with a warning.
    """

    block_size: int = DEFAULT_BLOCK_SIZE
    min_seq_len: int = 8192
    mask_source: str | None = None
    profile: Any = None
    tau: float = DEFAULT_TAU
    box_cox_lambda: float = DEFAULT_BOX_COX_LAMBDA
    mu: float = DEFAULT_MU
    density: float | None = None
    mass_target: float = DEFAULT_MASS_TARGET
    estimator: str = DEFAULT_ESTIMATOR
    sink_blocks: int = DEFAULT_SINK_BLOCKS
    local_blocks: int = DEFAULT_LOCAL_BLOCKS
    dense_layers: int = 1
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
        _require_int("dense_layers", self.dense_layers, minimum=0)
        if self.profile is not None:
            try:
                object.__setattr__(self, "profile", as_profile(self.profile))
            except (OSError, ValueError) as err:
                raise ValueError(f"profile: {err}") from err
        if self.mask_source is not None:
            _require_choice("mask_source", self.mask_source, MASK_SOURCES)
        if self.source == "calibrated" and self.profile is None:
            raise ValueError("mask_source='calibrated' needs a profile (options={'profile': path_or_profile})")
        _require_choice("estimator", self.estimator, ESTIMATORS)
        _require_fraction("mu", self.mu)
        if self.density is not None:
            _require_fraction("density", self.density)
        _require_number("mass_target", self.mass_target)
        if not 0.0 <= self.mass_target <= 1.0:
            raise ValueError(f"mass_target must lie in [0, 1], got {self.mass_target!r}")
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


    @property
    def source(self) -> str:
        """The mask source in effect: ``mask_source``, or when unset ``"calibrated"`` with a profile and
        ``"dynamic"`` without."""
        if self.mask_source is not None:
            return self.mask_source
        return "dynamic" if self.profile is None else "calibrated"

    def mask_options(self) -> MaskOptions:
        """The plain values the graph pass builds each site's plan and op from (the profile itself goes to the
        pass separately); an unset ``density`` becomes the estimator's ``density`` defaults (its registry entry)."""
        defaults = ESTIMATOR_SPECS[self.estimator].density
        return MaskOptions(
            source=self.source, block_size=self.block_size, min_seq_len=self.min_seq_len, kernel=self.kernel,
            tau=self.tau, box_cox_lambda=self.box_cox_lambda, mu=self.mu,
            density=defaults.prefill_cap if self.density is None else self.density,
            decode_density=defaults.decode_floor if self.density is None else self.density,
            mass_target=self.mass_target, sink_blocks=self.sink_blocks, local_blocks=self.local_blocks,
            estimator=self.estimator, dense_layers=self.dense_layers,
            corner_len=self.profile.pcl if self.source == "calibrated" else 0,
        )

    def describe(self) -> dict[str, Any]:
        """The options as plain values (the profile by its summary, with the heads it runs dynamic per module),
        for dumps and logs."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["mask_source"] = self.source
        if self.profile is not None:
            p = self.profile
            values["profile"] = {"modules": len(p.modules), "pcl": p.pcl, "tau": p.tau, "mu": p.mu,
                                 "box_cox_lambda": p.box_cox_lambda, "model_fingerprint": p.model_fingerprint,
                                 "head_shard": p.head_shard,
                                 **p.dynamic_summary()}
        return values


def option_names() -> set[str]:
    return {f.name for f in fields(DAMConfig)}


def _require_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _require_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")


def _require_fraction(name: str, value: Any) -> None:
    _require_number(name, value)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must lie in (0, 1], got {value!r}")


def _require_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
