"""The fidelity benchmark's variants: their names, how their rows are labelled and ordered, which run in what
order at which densities (the matched baselines at dam-default's measured ones), and the backend options of each
DAM variant.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from statistics import mean

from fidelity_variants import BASELINES

from dam_compile.config import DAMConfig

DENSITIES = (0.10, 0.15)
DAM_VARIANTS = ("dam-default", "dam-pooled", "dam-last-block", "dam-calibrated-hybrid")
AT_NOMINAL = ("dam-pooled", "dam-last-block")  # DAM variants run at each --densities cap
VARIANTS = ("full", *DAM_VARIANTS, *BASELINES)
# The smoke's dam-default density cap (see dam_options).
SMOKE_DEFAULT_DENSITY = 0.3


@dataclass
class Variant:
    """One evaluated configuration. ``density``: the DAM cap or the baseline's prefill density (``None``: full
    attention, or a DAM variant as configured); a matched baseline takes per length the prefill and decode
    densities dam-default measured (``per_length``)."""

    name: str
    density: float | None = None
    matched: bool = False
    per_length: dict[int, tuple[float, float]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return row_label(dict(variant=self.name, matched=self.matched, nominal_density=self.density))

    def densities(self, length: int) -> tuple[float, float]:
        """(prefill, decode) densities of a baseline at ``length``."""
        return self.per_length[length] if self.matched else (self.density, self.density)


def row_label(row: dict) -> str:
    """``full``, ``dam-default``, ``dam-calibrated-hybrid``, ``streaming@matched`` or ``dam-pooled@0.1``."""
    if row["matched"]:
        return f"{row['variant']}@matched"
    if row["variant"] in AT_NOMINAL or row["variant"] in BASELINES:
        return f"{row['variant']}@{row['nominal_density']:g}"
    return row["variant"]


def label_order(label: str) -> tuple:
    name, _, density = label.partition("@")
    return VARIANTS.index(name), density != "matched", density


def fixed_variants(wanted: list[str], densities: list[float]) -> list[Variant]:
    """The variants whose settings do not depend on measurements, in evaluation order (full and the default
    first: the matched baselines need the default's densities)."""
    out = [Variant("full")] * ("full" in wanted)
    out += [Variant("dam-default", DAMConfig().density)] * ("dam-default" in wanted)
    out += [Variant(name, d) for name in BASELINES if name in wanted for d in densities]
    out += [Variant(name, d) for name in AT_NOMINAL if name in wanted for d in densities]
    out += [Variant("dam-calibrated-hybrid")] * ("dam-calibrated-hybrid" in wanted)
    return out


def matched_densities(rows: list[dict], seed: int) -> dict[int, tuple[float, float]]:
    """Per length, the mean prefill and decode densities of this seed's dam-default rows."""
    by_length: dict[int, list[dict]] = {}
    for r in rows:
        if r["variant"] == "dam-default" and r["seed"] == seed:
            by_length.setdefault(r["length"], []).append(r)
    return {n: (mean(r["density"] for r in got), mean(r["density_decode"] for r in got))
            for n, got in by_length.items()}


def dam_options(variant: Variant, args: argparse.Namespace, profile, device: str) -> dict:
    """The backend options of a DAM variant: DAMConfig's defaults but for forced sparsity (``min_seq_len=0``),
    the CPU's reference kernel and what the variant changes."""
    options: dict = dict(min_seq_len=0, strict=True)  # strict: a failed rewrite must not pass for DAM running dense
    if device != "cuda":
        options["kernel"] = "reference"
    if args.smoke:
        options["inner_backend"] = "eager"  # the smoke checks the pipeline; Inductor's CPU compile is minutes
        # The smoke's barely trained model attends uniformly, so the default keeps every block for 0.99 of the
        # mass: a cap makes its plans sparse, which is what the pipeline check needs.
        options["density"] = SMOKE_DEFAULT_DENSITY
    if args.block_size:
        options["block_size"] = args.block_size
    if variant.name == "dam-pooled":
        options.update(estimator="pooled", density=variant.density)
    elif variant.name == "dam-last-block":
        options.update(estimator="last_block", density=variant.density)
    elif variant.name == "dam-calibrated-hybrid":
        options.update(mask_source="calibrated", profile=profile)
    return options
