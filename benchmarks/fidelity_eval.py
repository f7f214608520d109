"""The fidelity benchmark's evaluation: every wanted variant scored on the held-out samples through
``generate()`` and teacher-forced, with the densities of the plans our op ran and the prefill timed against the
best dense path; the calibrated hybrid's profile; a failing variant recorded in ``errors`` while the others run.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import sys
import time
from dataclasses import dataclass, field
from statistics import mean
from typing import Callable

import torch

import fidelity_tasks as ft
from fidelity_lineup import DAM_VARIANTS, Variant, dam_options, fixed_variants, matched_densities
from fidelity_samples import generate_correct, held_out, teacher_forced_correct
from fidelity_variants import BASELINES, BaselineAttention
from prefill_timing import compiled_forward, prefill_ms

import dam_compile
from dam_compile.config import DAMConfig
from dam_compile.plan.plan_stats import PlanStats


# ---- calibration ---------------------------------------------------------------------------------------------

def calibrated_profile(model, args: argparse.Namespace, device: str) -> tuple[object, dict]:
    """``dam_compile.calibrate`` with its defaults on training-distribution prompts, plus held-out prompts of
    ``--holdout-len`` tokens where it takes ``holdout=`` (to find the heads that must stay dynamic)."""
    calibration = [s.prompt[None].to(device) for s in held_out("calibration", args.pcl, 2)]
    kwargs = {}
    if "holdout" in inspect.signature(dam_compile.calibrate).parameters:
        kwargs["holdout"] = [s.prompt[None].to(device) for s in held_out("holdout", args.holdout_len, 1)]
    start = time.perf_counter()
    profile = dam_compile.calibrate(model, calibration, pcl=args.pcl, progress=False, **kwargs)
    info = dict(pcl=args.pcl, samples=len(calibration), holdout_samples=len(kwargs.get("holdout", [])) or None,
                holdout_len=args.holdout_len if kwargs else None, seconds=round(time.perf_counter() - start, 1),
                dynamic_heads=dynamic_heads(profile))
    return profile, info


def dynamic_heads(profile) -> dict[str, list[int]] | None:
    """Per module, the heads the profile runs with the dynamic plan (``None``: a profile without them)."""
    found = {name: getattr(module, "dynamic_heads", None) for name, module in profile.modules.items()}
    if all(heads is None for heads in found.values()):
        return None
    return {name: heads.nonzero().flatten().tolist() for name, heads in found.items() if heads is not None}


# ---- evaluation ----------------------------------------------------------------------------------------------

@dataclass
class Scores:
    """One (variant, length, task)'s per-sample results."""

    generate: list[bool] = field(default_factory=list)
    teacher_forced: list[bool] = field(default_factory=list)
    prefill: list[float] = field(default_factory=list)  # mean measured density of each sample's prefill calls
    decode: list[float] = field(default_factory=list)


def score_sample(model, variant: Variant, sample: ft.Sample, device: str, scores: Scores) -> None:
    """Generate (densities recorded from the op's plans), then the teacher-forced score."""
    with PlanStats() as stats:
        scores.generate.append(generate_correct(model, sample, device))
    prefill, decode = measured(stats, variant)
    scores.prefill.append(prefill)
    scores.decode.append(decode)
    scores.teacher_forced.append(teacher_forced_correct(model, sample, device))


def measured(stats: PlanStats, variant: Variant) -> tuple[float, float]:
    """Mean density of one generate()'s prefill and decode calls of our op (full attention: 1.0). A sparse
    variant whose prefill or decode never reached the op would be full attention under another name: refused.
    The first ``dense_layers`` layers' decode steps stay the model's SDPA call (decided when compiled: no op
    call to record), so they are counted here at 1.0, as their prefill calls are by the op."""
    if variant.name == "full":
        return 1.0, 1.0
    if not stats.prefill or not stats.decode:
        raise RuntimeError(f"{variant.label}: generate() made {len(stats.prefill)} prefill and {len(stats.decode)} "
                           "decode calls of dam::sparse_attention; every attention call should reach it")
    layers, dense = len(stats.prefill), DAMConfig().dense_layers  # one prefill: one call per layer
    steps = len(stats.decode) // max(1, layers - dense)
    return mean(stats.prefill), (sum(stats.decode) + dense * steps) / (layers * steps)


def attention_for(model, variant: Variant, length: int, index: int, args: argparse.Namespace, device: str):
    """The eager attention interception of a baseline for one sample (nothing for full and DAM variants)."""
    if variant.name not in BASELINES:
        return contextlib.nullcontext()
    prefill, decode = variant.densities(length)
    return BaselineAttention(model, variant.name, prefill, decode, args.block_size or DAMConfig().block_size,
                             seed=args.seed * 1000 + index, kernel="auto" if device == "cuda" else "reference")


def score_length(model, variant: Variant, samples: list[ft.Sample], args: argparse.Namespace,
                 device: str) -> dict[str, Scores]:
    """Every sample of one length, each under its own baseline interception (the random draws differ)."""
    by_task = {task: Scores() for task in ft.TASKS}
    for i, sample in enumerate(samples):
        with attention_for(model, variant, len(sample.prompt), i, args, device):
            score_sample(model, variant, sample, device, by_task[sample.task])
    return by_task


def rows_of(variant: Variant, length: int, by_task: dict[str, Scores], seed: int, speed: dict) -> list[dict]:
    """One row per task: accuracies (%), measured densities and the (variant, length)'s prefill speed."""
    def pct(hits: list[bool]) -> float:
        return 100.0 * sum(hits) / len(hits)

    nominal = variant.densities(length)[0] if variant.matched else variant.density
    return [dict(seed=seed, variant=variant.name, matched=variant.matched, nominal_density=nominal, length=length,
                 task=task, samples=len(s.generate), accuracy=pct(s.generate),
                 accuracy_teacher_forced=pct(s.teacher_forced), density=mean(s.prefill), density_decode=mean(s.decode),
                 **speed) for task, s in by_task.items()]


def progress(seed: int, variant: Variant, length: int, rows: list[dict], seconds: float) -> None:
    """One line per (variant, length), so a run's partial output already says how each fares and how long it
    took (compiles included)."""
    speedup = rows[0]["prefill_speedup"]
    print(f"[seed {seed}] {variant.label:26s} {length:>6}: generate {mean(r['accuracy'] for r in rows):5.1f}%  "
          f"teacher-forced {mean(r['accuracy_teacher_forced'] for r in rows):5.1f}%  density "
          f"{mean(r['density'] for r in rows):.3f} (decode {mean(r['density_decode'] for r in rows):.3f})  speedup "
          + ("-" if speedup is None else f"{speedup:.2f}x") + f"  ({seconds:.0f} s)", flush=True)


# ---- speed ---------------------------------------------------------------------------------------------------

def speed_of(model, variant: Variant, ids: torch.Tensor, dense: dict | None, runs: int) -> dict:
    """The row fields of a (variant, length)'s prefill timing; ``None`` with ``speed_note`` where none is
    taken."""
    if variant.name in BASELINES:
        return dict(prefill_ms=None, dense_ms=None, dense_path=None, prefill_speedup=None,
                    speed_note="eager baseline (plans built in Python per call): not a speed path")
    if dense is None:
        return dict(prefill_ms=None, dense_ms=None, dense_path=None, prefill_speedup=None,
                    speed_note="CPU run (kernel='reference'): not timed")
    best_ms, best = dense[dense["best"]], dense["best"].removesuffix("_ms")
    ms = best_ms if variant.name == "full" else prefill_ms(model, ids, runs)
    return dict(prefill_ms=ms, dense_ms=best_ms, dense_path=best, prefill_speedup=best_ms / ms, speed_note=None)


# ---- the run -------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """What every variant's evaluation shares."""

    model: torch.nn.Module
    args: argparse.Namespace
    device: str
    samples: dict[int, list[ft.Sample]]
    dense: dict[int, dict] = field(default_factory=dict)
    profile: object = None
    rows: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)


def evaluate_variant(run: Run, variant: Variant) -> list[dict]:
    """Score ``variant`` at every length (compiled once for DAM variants) and time its prefill."""
    options = dam_options(variant, run.args, run.profile, run.device) if variant.name in DAM_VARIANTS else None
    rows = []
    with compiled_forward(run.model, options) if options is not None else contextlib.nullcontext():
        for length, samples in run.samples.items():
            if variant.matched and length not in variant.per_length:
                print(f"[seed {run.args.seed}] {variant.label} {length}: no dam-default rows to match, skipped")
                continue
            start = time.perf_counter()
            by_task = score_length(run.model, variant, samples, run.args, run.device)
            ids = samples[0].prompt[None].to(run.device)
            speed = speed_of(run.model, variant, ids, run.dense.get(length), run.args.timing_runs)
            rows += rows_of(variant, length, by_task, run.args.seed, speed)
            progress(run.args.seed, variant, length, rows[-len(by_task):], time.perf_counter() - start)
    return rows


def matched_variants(run: Run, wanted: list[str]) -> list[Variant]:
    """The baselines at the densities dam-default measured (this run's rows, else ``--match-from``'s)."""
    per_length = matched_densities(run.rows, run.args.seed)
    if not per_length and run.args.match_from:
        per_length = matched_densities(json.loads(run.args.match_from.read_text())["rows"], run.args.seed)
    if not per_length:
        if any(name in wanted for name in BASELINES):
            print(f"no dam-default rows for seed {run.args.seed}: the matched baselines are skipped (run "
                  "dam-default in this part or pass --match-from)", file=sys.stderr)
        return []
    return [Variant(name, matched=True, per_length=per_length) for name in BASELINES if name in wanted]


def evaluate(run: Run, save: Callable[[], None]) -> None:
    """Every wanted variant, full and dam-default first, then the baselines at their matched densities, then
    the rest; ``save`` after each variant so a run cut short keeps its rows."""
    wanted = [v for v in run.args.variants.split(",") if v]
    fixed = fixed_variants(wanted, [float(d) for d in run.args.densities.split(",") if d])
    first = [v for v in fixed if v.name in ("full", "dam-default")]
    for variant in first:
        evaluate_or_record(run, variant)
        save()
    for variant in matched_variants(run, wanted) + [v for v in fixed if v not in first]:
        evaluate_or_record(run, variant)
        save()


def evaluate_or_record(run: Run, variant: Variant) -> None:
    """Add the variant's rows; a variant that fails is recorded in ``errors`` (and said on stderr) so the
    others still run."""
    try:
        run.rows += evaluate_variant(run, variant)
    except Exception as err:  # noqa: BLE001 - one broken variant must not cost the others' device time
        message = f"{type(err).__name__}: {err}".split("\n")[0][:400]
        run.errors.append(dict(seed=run.args.seed, variant=variant.label, error=message))
        print(f"[seed {run.args.seed}] {variant.label} FAILED: {message}", file=sys.stderr, flush=True)
