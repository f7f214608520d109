"""The fidelity benchmark's quality check: full attention must answer held-out check samples of every task at
every checked length (>= :data:`QUALITY_THRESHOLD` %) before variants are compared on the stand-in; a failure is
named, and warned about, never hidden.
"""

from __future__ import annotations

import copy
import sys

import fidelity_tasks as ft
from fidelity_samples import generate_correct, held_out

QUALITY_THRESHOLD = 95.0  # % of check samples full attention must answer, per task and length


def quality_check(model, lengths: list[int], per_task: int, device: str) -> dict:
    """Full attention's accuracy through ``generate`` on check samples (seeds disjoint from the evaluation's),
    per task and length; ``passed`` when every one reaches :data:`QUALITY_THRESHOLD`."""
    accuracy: dict[str, dict[str, float]] = {task: {} for task in ft.TASKS}
    for length in lengths:
        samples = held_out("check", length, per_task)
        for task in ft.TASKS:
            hits = [generate_correct(model, s, device) for s in samples if s.task == task]
            accuracy[task][str(length)] = 100.0 * sum(hits) / len(hits)
    passed = all(a >= QUALITY_THRESHOLD for per_length in accuracy.values() for a in per_length.values())
    return {"passed": passed, "threshold": QUALITY_THRESHOLD, "samples_per_task": per_task, "accuracy": accuracy}


def failures(check: dict) -> list[str]:
    return [f"{task}@{length}: {a:.0f}%" for task, per_length in check["accuracy"].items()
            for length, a in per_length.items() if a < check["threshold"]]


def describe_check(check: dict) -> str:
    return "passed" if check["passed"] else "FAILED (" + ", ".join(failures(check)) + ")"


def warn_under_trained(by_seed: dict[str, dict]) -> None:
    failed = {seed: failures(check) for seed, check in by_seed.items() if not check["passed"]}
    if failed:
        print("WARNING: the stand-in has not learned the tasks: full attention is below "
              f"{QUALITY_THRESHOLD:.0f}% on " + "; ".join(f"seed {s}: {', '.join(f)}" for s, f in failed.items())
              + ". The variants are compared on an under-trained model.", file=sys.stderr, flush=True)


def checked_at_lengths(model, training: dict, lengths: list[int], per_task: int, device: str) -> dict:
    """The training's quality check, extended (without training) to evaluated lengths it did not cover (all of
    them when the weights come from an unfinished run, which has none)."""
    check = copy.deepcopy(training.get("quality_check") or quality_check(model, [], per_task, device))
    missing = [n for n in lengths if str(n) not in check["accuracy"][ft.TASKS[0]]]
    if missing:
        extra = quality_check(model, missing, per_task, device)
        for task, per_length in extra["accuracy"].items():
            check["accuracy"][task].update(per_length)
        check["passed"] = check["passed"] and extra["passed"]
    return check
