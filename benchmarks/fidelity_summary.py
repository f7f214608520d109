"""The fidelity benchmark's summary (the fields of ``../shared/RESULTS.md`` and one entry per variant, every
``None`` with its why) and the merge of part files (variants, lengths or seeds of one recipe) into one results
file.
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean

from bench_common import RESULTS, gpu_tag, merged_header, write_result
from fidelity_check import QUALITY_THRESHOLD, failures, warn_under_trained
from fidelity_lineup import label_order, row_label
from fidelity_plot import plot

LEGACY = "dam-pooled@0.15"  # the default options when the teacher-forced `_at_15pct` fields were defined


# ---- summary -------------------------------------------------------------------------------------------------

Key = tuple[int, int, str]  # (seed, length, task)


def keyed(rows: list[dict], label: str) -> dict[Key, dict]:
    return {(r["seed"], r["length"], r["task"]): r for r in rows if row_label(r) == label}


def max_gap(rows: list[dict], label: str, field_name: str = "accuracy") -> float | None:
    """Max over seeds, lengths and tasks of full attention's accuracy minus ``label``'s (points)."""
    full, ours = keyed(rows, "full"), keyed(rows, label)
    gaps = [full[k][field_name] - ours[k][field_name] for k in ours if k in full]
    return max(gaps) if gaps else None


def min_margin(rows: list[dict], label: str, streaming: str, field_name: str = "accuracy") -> float | None:
    """Min over seeds, lengths and tasks of ``label``'s accuracy minus StreamingLLM's (points)."""
    ours, base = keyed(rows, label), keyed(rows, streaming)
    margins = [ours[k][field_name] - base[k][field_name] for k in ours if k in base]
    return min(margins) if margins else None


def mean_of(rows: list[dict], label: str, field_name: str, length: int | None = None) -> float | None:
    got = [r[field_name] for r in rows if row_label(r) == label and r.get(field_name) is not None
           and (length is None or r["length"] == length)]
    return mean(got) if got else None


def variant_summary(rows: list[dict], label: str) -> dict:
    """Per variant: max gap to full (through generate and teacher-forced), min margin over StreamingLLM at its
    density (matched for DAM), mean measured densities and mean prefill speedup."""
    nominal = label.split("@", 1)[1] if "@" in label else "matched"
    margin = None if label.startswith("streaming") else min_margin(rows, label, f"streaming@{nominal}")
    return {"max_gap_to_full": max_gap(rows, label),
            "max_gap_to_full_teacher_forced": max_gap(rows, label, "accuracy_teacher_forced"),
            "min_margin_over_streamingllm": margin,
            "mean_density": mean_of(rows, label, "density"),
            "mean_density_decode": mean_of(rows, label, "density_decode"),
            "mean_prefill_speedup": mean_of(rows, label, "prefill_speedup")}


def why_missing(label: str, length: int | None = None) -> str:
    at = f" at {length}" if length else ""
    return f"no {label} rows{at} in this file (not in --variants/--lengths of any part, or failed: see errors)"


def summarize(rows: list[dict], quality: dict, errors: list[dict] = ()) -> dict:
    """The fidelity fields of ``../shared/RESULTS.md`` (through ``generate()``), the teacher-forced ``_at_15pct``
    fields kept from earlier versions (for :data:`LEGACY`, the options they were defined on, so old and new files
    compare), and ``by_variant``; every ``None`` has its ``why`` in ``notes``."""
    summary: dict = {
        "max_gap_to_full_default": max_gap(rows, "dam-default"),
        "mean_density_default_16k": mean_of(rows, "dam-default", "density", 16384),
        "mean_density_default_32k": mean_of(rows, "dam-default", "density", 32768),
        "min_margin_over_streamingllm_default": min_margin(rows, "dam-default", "streaming@matched"),
        "max_gap_calibrated_hybrid": max_gap(rows, "dam-calibrated-hybrid"),
        "scored_through_generate": True,
        "max_gap_to_full_at_15pct": max_gap(rows, LEGACY, "accuracy_teacher_forced"),
        "min_margin_over_streamingllm_at_15pct": min_margin(rows, LEGACY, "streaming@0.15", "accuracy_teacher_forced"),
        "mass_recall_at_15pct": None,
    }
    notes = {
        "max_gap_to_full_default": why_missing("dam-default or full"),
        "mean_density_default_16k": why_missing("dam-default", 16384),
        "mean_density_default_32k": why_missing("dam-default", 32768),
        "min_margin_over_streamingllm_default": why_missing("dam-default or streaming@matched"),
        "max_gap_calibrated_hybrid": why_missing("dam-calibrated-hybrid or full"),
        "max_gap_to_full_at_15pct": why_missing(f"{LEGACY} or full"),
        "min_margin_over_streamingllm_at_15pct": why_missing(f"{LEGACY} or streaming@0.15"),
        "mass_recall_at_15pct": "the bench scores through generate(): the DAM variants run compiled, where the "
                                "Q/K that recall needs are not at hand (a diagnostic, not a target)",
    }
    summary["notes"] = {k: why for k, why in notes.items() if summary[k] is None}
    if not quality["passed"]:
        failed = {s: failures(c) for s, c in quality["by_seed"].items() if not c["passed"]}
        summary["notes"]["quality_check"] = (
            "the comparison is on an UNDER-TRAINED model: full attention is below "
            f"{QUALITY_THRESHOLD:.0f}% on " + "; ".join(f"seed {s}: {', '.join(f)}" for s, f in failed.items()))
    if errors:
        summary["notes"]["errors"] = "; ".join(f"seed {e['seed']} {e['variant']}: {e['error'][:120]}" for e in errors)
    labels = sorted({row_label(r) for r in rows if r["variant"] != "full"}, key=label_order)
    summary["by_variant"] = {label: variant_summary(rows, label) for label in labels}
    return summary


# ---- merge ---------------------------------------------------------------------------------------------------

def row_key(row: dict) -> tuple:
    density = "matched" if row["matched"] else row["nominal_density"]
    return row["seed"], row["variant"], density, row["length"], row["task"]


def recipes_but_seed(part: dict) -> list[str]:
    return sorted({json.dumps({k: v for k, v in t["recipe"].items() if k != "seed"}, sort_keys=True, default=str)
                   for t in part["training"].values()})


def unresolved_errors(parts: list[dict], rows) -> list[dict]:
    """The parts' errors, less those of a (seed, variant) that a later part measured after all."""
    measured = {(r["seed"], row_label(r)) for r in rows}
    return [e for part in parts for e in part.get("errors", []) if (e["seed"], e["variant"]) not in measured]


def merge(parts: list[Path], out: Path | None) -> dict:
    """One results file from parts of one recipe (variants, lengths or training seeds apart; a later part's row
    replaces an earlier one of the same key); summary and plot recomputed."""
    loaded, result = merged_header(parts, same={"recipe (but the seed)": recipes_but_seed})
    rows = {row_key(r): r for part in loaded for r in part["rows"]}
    by_seed = {s: c for part in loaded for s, c in part["quality_check"]["by_seed"].items()}
    quality = {"passed": all(c["passed"] for c in by_seed.values()), "by_seed": by_seed}
    result.update(
        config={**loaded[0]["config"], "lengths": ",".join(map(str, sorted({r["length"] for r in rows.values()})))},
        training={s: t for part in loaded for s, t in part["training"].items()},
        quality_check=quality,
        calibration={s: c for part in loaded for s, c in part.get("calibration", {}).items()},
        dense_prefill={s: d for part in loaded for s, d in part.get("dense_prefill", {}).items()},
        rows=list(rows.values()), errors=unresolved_errors(loaded, rows.values()),
    )
    result["summary"] = summarize(result["rows"], quality, result["errors"])
    warn_under_trained(by_seed)
    path = write_result(result, "fidelity", False, out or RESULTS / f"fidelity_{gpu_tag(result['device'])}.json")
    plot(result["rows"], path.with_suffix(".png"))
    return result
