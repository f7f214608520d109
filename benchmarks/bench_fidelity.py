"""Fidelity: does DAM keep the answers? Retrieval accuracy through ``generate()`` against measured block density
and prefill speed, for full attention, DAM as users compile it, StreamingLLM, the oracle and random blocks.

Pretrained long-context weights cannot be downloaded here, so the run trains its own stand-in: a Llama-shaped
``LlamaForCausalLM`` (6 layers, hidden 512, 8 query / 2 KV heads, RoPE) on the synthetic tasks of
``fidelity_tasks.py`` (passkey, multi-key needles, LongEval-style line retrieval, variable tracking), lengths
256 to 32K. Before any comparison, full attention must answer held-out check samples of every task at every
evaluated length (>= 95%); the stand-in trains further rounds at the longest lengths until it does, or the
results say loudly that the comparison is on an under-trained model.

Scoring: each held-out prompt is answered by greedy ``model.generate`` (exact match of the whole answer), so
the prefill and every decode step run through the variant's attention; the teacher-forced score (every answer
token the argmax after the right prefix, one forward) sits beside it. Variants:

- ``full``: plain eager ``generate`` (SDPA);
- ``dam-default``, ``dam-pooled``, ``dam-last-block`` (at each ``--densities`` cap),
  ``dam-calibrated-hybrid`` (a profile from ``dam_compile.calibrate``): compiled as users run them,
  ``model.forward = torch.compile(model.forward, backend=dam_compile.backend(**options), dynamic=True)``, so the
  prefill and the decode steps go through ``dam::dynamic_plan`` / ``dam::decode_plan`` /
  ``dam::sparse_attention`` (``min_seq_len=0``; on CPU ``kernel="reference"``);
- ``streaming``, ``oracle``, ``random`` (``fidelity_variants.py``): eager, every attention call through our op
  with the baseline's plan, at the density the default measured per length (``@matched``) and at each
  ``--densities`` value.

Densities are those of the plans ``dam::sparse_attention`` ran (``kernels/plan_stats.py``), prefill and decode
apart. On CUDA each DAM variant's compiled prefill (``logits_to_keep=1``) is timed against full attention's
best dense path (eager SDPA or inductor, the faster).

    python benchmarks/bench_fidelity.py --seed 0 --train-only --weights-dir W    # train, check, save shards
    python benchmarks/bench_fidelity.py --seed 0 --eval-only --weights-dir W --variants full,dam-default,streaming
    python benchmarks/bench_fidelity.py --merge part1.json part2.json            # one file, summary, plot
    python benchmarks/bench_fidelity.py --smoke --out /tmp/f.json                # CPU pipeline check, no claims
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import inspect
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Callable, Iterator

import torch
from tqdm import tqdm

import fidelity_tasks as ft
from bench_common import (RESULTS, gpu_tag, int_list, merged_header, parse_with_smoke, result_path, run_metadata,
                          write_result)
from fidelity_variants import BASELINES, BaselineAttention
from fidelity_weights import load_weights, save_weights
from prefill_timing import compiled_forward, dense_baselines, prefill_ms

import dam_compile
from dam_compile.config import DAMConfig
from dam_compile.plan.plan_stats import PlanStats

DENSITIES = (0.10, 0.15)
DAM_VARIANTS = ("dam-default", "dam-pooled", "dam-last-block", "dam-calibrated-hybrid")
AT_NOMINAL = ("dam-pooled", "dam-last-block")  # DAM variants run at each --densities cap
VARIANTS = ("full", *DAM_VARIANTS, *BASELINES)
QUALITY_THRESHOLD = 95.0  # % of check samples full attention must answer, per task and length
SEED_FAMILY = {"eval": 1, "check": 2, "calibration": 3, "holdout": 4}  # disjoint sample seeds per use
LEGACY = "dam-pooled@0.15"  # the default options when the teacher-forced `_at_15pct` fields were defined
WEIGHTS = Path(__file__).resolve().parent / "weights"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="8192,16384,32768", help="evaluation prompt lengths")
    # The default recipe is the committed weights'. A longer one (3600 steps with 16K and 32K doubled, then two
    # further rounds) trained worse on both seeds on an H200 (kv_lines 0% at every length, multikey 12-62%):
    # benchmarks/results/fidelity_h200_recipe3600_train.log.
    p.add_argument("--train-lengths", default="256,512,1024,2048,4096,8192,16384,32768",
                   help="curriculum, shortest first; each entry gets an equal share of the steps (repeat one to give "
                        "it more); extra rounds train on the last three")
    p.add_argument("--train-steps", type=int, default=2400)
    p.add_argument("--train-tokens", type=int, default=65536,
                   help="tokens per training step (tokens // length rows, at least one)")
    p.add_argument("--train-questions", type=int, default=16,
                   help="questions asked (and answered) after each training context: more answers per sequence")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW, warmup then cosine)")
    p.add_argument("--extra-steps", type=int, default=400, help="steps of each further training round")
    p.add_argument("--max-train-rounds", type=int, default=0,
                   help="further rounds at most while full attention fails the quality check (the longer recipe's "
                        "two rounds did not lift it)")
    p.add_argument("--check-lengths", default="8192,16384,32768",
                   help="lengths of the quality check run after training (evaluated lengths outside it are checked "
                        "before evaluating, without training further)")
    p.add_argument("--check-samples", type=int, default=8, help="quality-check samples per task and length")
    p.add_argument("--samples", type=int, default=12, help="held-out samples per (task, length), depths 0..1")
    p.add_argument("--densities", default=",".join(map(str, DENSITIES)),
                   help="nominal densities of dam-pooled, dam-last-block and the baselines")
    p.add_argument("--variants", default=",".join(VARIANTS), help="which to evaluate: " + ", ".join(VARIANTS))
    p.add_argument("--match-from", type=Path, metavar="PART",
                   help="a results file whose dam-default rows (same seed) give the matched densities, for a part "
                        "that runs the baselines without dam-default")
    p.add_argument("--pcl", type=int, default=128, help="pattern capture length of the calibrated profile")
    p.add_argument("--holdout-len", type=int, default=4096,
                   help="length of the held-out samples given to calibrate(holdout=...) where it takes them")
    p.add_argument("--block-size", type=int, help="plan block size (default: DAMConfig's)")
    p.add_argument("--timing-runs", type=int, default=5, help="timed prefill runs per variant and length (median)")
    p.add_argument("--seed", type=int, default=0, help="training seed (rows carry it; --merge joins seeds)")
    p.add_argument("--weights-dir", "--cache-dir", dest="weights_dir", type=Path, default=WEIGHTS,
                   help="trained weights as safetensors shards (< 15 MiB each), keyed by the recipe's hash; loaded "
                        "when present (the default folder is git-ignored, so it can be carried to a device run)")
    p.add_argument("--eval-only", action="store_true", help="never train: the weights must be in --weights-dir")
    p.add_argument("--train-only", action="store_true", help="train, check and save the weights; no evaluation")
    p.add_argument("--quick", action="store_true", help="8K only, 4 samples per task")
    p.add_argument("--smoke", action="store_true",
                   help="CPU pipeline check: tiny model, 256-512 tokens, kernel='reference', no claims")
    p.add_argument("--merge", nargs="+", type=Path, metavar="PART",
                   help="merge part files (variants, lengths or seeds of one recipe) into one results file")
    p.add_argument("--out", type=Path)
    args = parse_with_smoke(p, argv, SMOKE, VARIANTS)
    if args.eval_only and args.train_only:
        p.error("--eval-only and --train-only exclude each other")
    if args.quick:
        args.lengths, args.samples = "8192", 4
    return args


SMOKE_DEFAULT_DENSITY = 0.3
# The CPU pipeline check's sizes: every stage runs, nothing is claimed.
SMOKE = dict(lengths="256,512", check_lengths="256,512", train_lengths="256,512", train_steps=16, train_tokens=1024,
             extra_steps=4, max_train_rounds=1, samples=1, check_samples=1, densities="0.3", pcl=64, block_size=16,
             holdout_len=256, timing_runs=1)


def model_config(smoke: bool):
    import transformers

    size = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
            if smoke else dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8))
    return transformers.LlamaConfig(
        vocab_size=ft.VOCAB, num_key_value_heads=2, max_position_embeddings=65536, rope_theta=500000.0,
        attn_implementation="sdpa", **size)


# ---- samples -------------------------------------------------------------------------------------------------

def sample_seed(family: str, length: int, index: int) -> int:
    """Seeds of held-out samples: disjoint between uses (evaluation, check, calibration) and from training's
    (which are below 2**31 per context), the same for every training seed (seeds answer the same questions)."""
    return 10**10 * SEED_FAMILY[family] + length * 1000 + index


def held_out(family: str, length: int, per_task: int) -> list[ft.Sample]:
    """``per_task`` samples of every task at depths evenly spread over [0, 1]."""
    depths = [i / max(1, per_task - 1) for i in range(per_task)]
    return [ft.make_sample(task, length, depth, seed=sample_seed(family, length, t * 100 + i))
            for t, task in enumerate(ft.TASKS) for i, depth in enumerate(depths)]


@torch.no_grad()
def generate_correct(model, sample: ft.Sample, device: str) -> bool:
    """Greedy ``generate`` of exactly the answer's length (the end-of-text id is a task token here) gives the
    whole answer."""
    ids = sample.prompt[None].to(device)
    n = len(sample.answer)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=ft.PAD)
    return torch.equal(out[0, ids.shape[1]:].cpu(), sample.answer)


@torch.no_grad()
def teacher_forced_correct(model, sample: ft.Sample, device: str) -> bool:
    """Every answer token is the argmax after the right prefix (one forward, no cache)."""
    ids = torch.cat([sample.prompt, sample.answer[:-1]])[None].to(device)
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=len(sample.answer)).logits
    return bool(torch.equal(logits[0].argmax(-1).cpu(), sample.answer))


# ---- training ------------------------------------------------------------------------------------------------

class TrainingSteps(torch.utils.data.Dataset):
    """Step ``i``'s batch ``(ids, labels)``, ``tokens // length`` rows (at least one), deterministic in the seed
    so loader workers can build them. The main curriculum spends equal shares of the steps on each length,
    shortest first; a further round (``round_index >= 1``) cycles through its lengths."""

    ROUND_STRIDE = 10**5  # seeds of round r's steps start at r * ROUND_STRIDE

    def __init__(self, lengths: list[int], steps: int, tokens: int, seed: int, questions: int, round_index: int = 0):
        if steps >= self.ROUND_STRIDE:
            raise ValueError(f"at most {self.ROUND_STRIDE - 1} steps per round, got {steps}")
        self.lengths, self.steps, self.tokens, self.questions = lengths, steps, tokens, questions
        self.base_seed, self.round_index = seed * 10**7 + round_index * self.ROUND_STRIDE, round_index

    def __len__(self) -> int:
        return self.steps

    def length(self, step: int) -> int:
        if self.round_index:
            return self.lengths[step % len(self.lengths)]
        return self.lengths[min(len(self.lengths) - 1, step * len(self.lengths) // self.steps)]

    def __getitem__(self, step: int):
        length = self.length(step)
        return ft.training_batch(max(1, self.tokens // length), length, seed=self.base_seed + step,
                                 questions=self.questions)


def train(model, steps: TrainingSteps, lr: float, device: str) -> dict:
    """AdamW with warmup and cosine decay over ``steps``; the loss is on answer tokens only. Batches come from
    loader workers (Python-made; the GPU would wait for them otherwise)."""
    workers = min(8, (os.cpu_count() or 1) - 1) if device == "cuda" else 0
    loader = torch.utils.data.DataLoader(steps, batch_size=None, num_workers=workers,
                                         prefetch_factor=4 if workers else None)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    total, warmup = len(steps), max(1, len(steps) // 20)
    losses, start = [], time.perf_counter()
    model.train()
    bar = tqdm(loader, desc=f"train round {steps.round_index}", mininterval=10)
    for step, (ids, labels) in enumerate(bar):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=ids.to(device), labels=labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total))
        for group in opt.param_groups:
            group["lr"] = lr * max(scale, 0.05)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 49:
            bar.set_postfix(length=ids.shape[1], loss=f"{mean(losses[-50:]):.3f}")
    model.eval()
    tail = losses[-max(1, len(losses) // 10):]
    every = max(1, len(losses) // 50)  # the curve in 50 points, each the mean loss of its steps
    return {"round": steps.round_index, "steps": len(losses), "lengths": sorted(set(steps.lengths)),
            "seconds": round(time.perf_counter() - start, 1), "loss_first": losses[0], "loss_last": mean(tail),
            "loss_curve": [mean(losses[i:i + every]) for i in range(0, len(losses), every)]}


def recipe(args: argparse.Namespace) -> dict:
    """What the trained weights depend on (their cache key); not ``--max-train-rounds``, so allowing more rounds
    later continues the saved weights' training instead of starting over."""
    config = {k: v for k, v in model_config(args.smoke).to_dict().items() if k != "transformers_version"}
    return dict(config=config, steps=args.train_steps, tokens=args.train_tokens,
                lr=args.lr, questions=args.train_questions, lengths=args.train_lengths, seed=args.seed,
                extra_steps=args.extra_steps, check_lengths=args.check_lengths, check_samples=args.check_samples, check_threshold=QUALITY_THRESHOLD)


def weights_stem(rec: dict) -> str:
    key = hashlib.sha256(json.dumps(rec, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"fidelity_{key}"


def eval_dtype(device: str) -> torch.dtype:
    # Evaluated (and saved) in bf16 on CUDA, so a loaded model is the one that was checked, bit for bit.
    return torch.bfloat16 if device == "cuda" else torch.float32


def fresh_model(args: argparse.Namespace, device: str):
    import transformers

    torch.manual_seed(args.seed)
    return transformers.LlamaForCausalLM(model_config(args.smoke)).to(device)


def evaluated_copy(model, device: str):
    """The model as it is evaluated and saved (bf16 on CUDA), leaving the float32 training weights alone."""
    return copy.deepcopy(model).to(eval_dtype(device)).eval()


def trained_model(args: argparse.Namespace, device: str, log: Callable[[str], None]) -> tuple[torch.nn.Module, dict]:
    """The stand-in, ready to evaluate, and what its training did (recipe, rounds, losses, quality check).
    Saved weights of this recipe are used as they are when training is over for them (the check passed, or
    ``--max-train-rounds`` further rounds are done) or with ``--eval-only``; otherwise their training goes on
    (a run cut short, or more rounds allowed now). Without saved weights it trains from scratch. Weights are saved
    after the main curriculum, each check and each further round."""
    rec = recipe(args)
    stem = weights_stem(rec)
    model = fresh_model(args, device)
    saved = load_weights(args.weights_dir, stem, device)
    if saved is None and args.eval_only:
        raise SystemExit(f"--eval-only: no weights {stem}* in {args.weights_dir}; train this recipe first "
                         f"(same options, --train-only) or carry its shards there")
    if saved is not None:
        state, info = saved
        log(f"loaded {stem} from {args.weights_dir}: {info['rounds_done']} further rounds, quality check "
            + (describe_check(info["quality_check"]) if info.get("quality_check") else "not run yet"))
        if training_over(info, args.max_train_rounds) or args.eval_only:
            if info.get("quality_check") is None:
                print(f"WARNING: {stem} is from a training run cut short before its quality check", file=sys.stderr)
            model.to(eval_dtype(device)).load_state_dict(state)
            return model.eval(), dict(info, loaded=True)
        model.load_state_dict({k: v.float() for k, v in state.items()})
    else:
        steps = TrainingSteps(int_list(args.train_lengths), args.train_steps, args.train_tokens, args.seed,
                              args.train_questions)
        first = train(model, steps, args.lr, device)
        log(f"trained {first['steps']} steps in {first['seconds']:.0f} s: loss {first['loss_first']:.3f} -> "
            f"{first['loss_last']:.3f}")
        info = dict(recipe=rec, stem=stem, rounds=[first], rounds_done=0, quality_check=None)
        save_weights(evaluated_copy(model, device).state_dict(), info, args.weights_dir, stem)
    evaluated, info = train_until_checked(model, args, device, info, log)
    return evaluated, dict(info, loaded=False)


def training_over(info: dict, max_rounds: int) -> bool:
    check = info.get("quality_check")
    return check is not None and (check["passed"] or info["rounds_done"] >= max_rounds)


def train_until_checked(model, args: argparse.Namespace, device: str, info: dict,
                        log: Callable[[str], None]) -> tuple[torch.nn.Module, dict]:
    """Quality-check the model; while full attention fails and rounds remain, train a further round at the
    three longest curriculum lengths (a lower peak rate, on fresh data) and check again. Saves after each check
    and each round."""
    lengths = int_list(args.check_lengths)
    while True:
        evaluated = evaluated_copy(model, device)
        check = quality_check(evaluated, lengths, args.check_samples, device)
        info = dict(info, quality_check=check, max_train_rounds=args.max_train_rounds)
        save_weights(evaluated.state_dict(), info, args.weights_dir, info["stem"])
        log(f"quality check after {info['rounds_done']} further rounds: {describe_check(check)}")
        if training_over(info, args.max_train_rounds):
            return evaluated, info
        longest = sorted(set(int_list(args.train_lengths)))[-3:]
        steps = TrainingSteps(longest, args.extra_steps, args.train_tokens, args.seed, args.train_questions,
                              round_index=info["rounds_done"] + 1)
        info = dict(info, rounds=[*info["rounds"], train(model, steps, args.lr * 0.3, device)],
                    rounds_done=info["rounds_done"] + 1, quality_check=None)
        save_weights(evaluated_copy(model, device).state_dict(), info, args.weights_dir, info["stem"])


# ---- quality check -------------------------------------------------------------------------------------------

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


# ---- variants ------------------------------------------------------------------------------------------------

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


@contextlib.contextmanager
def threads(count: int | None) -> Iterator[None]:
    """``count`` intra-op threads while inside (``None``: unchanged)."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    # The smoke's matmuls are tiny: one thread beats two that contend with whatever else runs (3x on 2 cores).
    with threads(1 if args.smoke else None):
        return run_bench(args)


def run_bench(args: argparse.Namespace) -> dict:
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    log = tqdm.write
    model, training = trained_model(args, device, log)
    if args.train_only:
        print(json.dumps({k: v for k, v in training.items() if k != "rounds"}, indent=2, default=str))
        warn_under_trained({str(args.seed): training.get("quality_check") or {"passed": True}})
        return {"training": training}
    lengths = int_list(args.lengths)
    check = checked_at_lengths(model, training, lengths, args.check_samples, device)
    warn_under_trained({str(args.seed): check})
    run = Run(model, args, device, {n: held_out("eval", n, args.samples) for n in lengths})
    wanted = args.variants.split(",")
    if device == "cuda" and {"full", *DAM_VARIANTS} & set(wanted):
        run.dense = dense_baselines(model, {n: s[0].prompt[None].to(device) for n, s in run.samples.items()},
                                    args.timing_runs)
    calibration = None
    if "dam-calibrated-hybrid" in wanted:
        run.profile, calibration = calibrated_profile(model, args, device)
    out = args.out or (RESULTS / "fidelity_smoke.json" if args.smoke else None)
    path = result_path("fidelity", args.quick, out)

    def result() -> dict:
        return results_file(args, model, training, check, calibration, run)

    def save_partial() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result(), indent=2, default=str) + "\n")

    evaluate(run, save_partial)
    final = result()
    write_result(final, "fidelity", args.quick, path)
    plot(final["rows"], path.with_suffix(".png"))
    return final


def results_file(args: argparse.Namespace, model, training: dict, check: dict, calibration: dict | None,
                 run: Run) -> dict:
    import transformers

    result = run_metadata("fidelity")
    seed = str(args.seed)
    result.update(
        transformers=transformers.__version__,
        config=dict(model=model.config.to_dict(), block_size=args.block_size or DAMConfig().block_size,
                    lengths=args.lengths, densities=args.densities, samples_per_task=args.samples,
                    tasks=list(ft.TASKS), dam_defaults=DAMConfig().describe(), smoke=args.smoke,
                    weights="trained in this benchmark on the synthetic tasks (no pretrained weights)"),
        training={seed: {k: v for k, v in training.items() if k != "quality_check"}},
        quality_check={"passed": check["passed"], "by_seed": {seed: check}},
        calibration={seed: calibration} if calibration else {},
        dense_prefill={seed: {str(n): t for n, t in run.dense.items()}} if run.dense else {},
        rows=run.rows, errors=run.errors,
    )
    result["summary"] = summarize(run.rows, result["quality_check"], run.errors)
    return result


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


def label_order(label: str) -> tuple:
    name, _, density = label.partition("@")
    return VARIANTS.index(name), density != "matched", density


# ---- plot ----------------------------------------------------------------------------------------------------

def points(rows: list[dict], length: int) -> dict[str, tuple[float, float | None, float]]:
    """Per variant label at ``length``: (mean density, mean prefill speedup or None, mean generate accuracy),
    over tasks and seeds."""
    out = {}
    for label in sorted({row_label(r) for r in rows if r["length"] == length}, key=label_order):
        got = [r for r in rows if r["length"] == length and row_label(r) == label]
        speedups = [r["prefill_speedup"] for r in got if r.get("prefill_speedup") is not None]
        out[label] = (mean(r["density"] for r in got), mean(speedups) if speedups else None,
                      mean(r["accuracy"] for r in got))
    return out


def plot(rows: list[dict], path: Path) -> Path:
    """Accuracy through ``generate()`` against measured density (top) and prefill speedup over the best dense
    path (bottom), one column per length, one marker per variant (the same colour in every panel)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in rows})
    labels = sorted({row_label(r) for r in rows}, key=label_order)
    colour = dict(zip(labels, plt.get_cmap("tab20").colors))
    fig, axes = plt.subplots(2, max(1, len(lengths)), figsize=(5 * max(1, len(lengths)), 8), squeeze=False)
    for column, length in enumerate(lengths):
        for label, (density, speedup, accuracy) in points(rows, length).items():
            for row, x in ((0, density), (1, speedup)):
                ax = axes[row][column]
                if label == "full":
                    ax.axhline(accuracy, color="black", linestyle="--", label="full attention")
                elif x is not None:
                    ax.scatter([x], [accuracy], color=colour[label], label=label,
                               marker="o" if label.startswith("dam") else "x")
        density_axis(axes[0][column], matplotlib.ticker)
        axes[0][column].set_title(f"{length // 1024}K tokens" if length >= 1024 else f"{length} tokens")
        axes[1][column].set_xlabel("prefill speedup over the best dense path (x)")
        if not any(p[1] for p in points(rows, length).values()):
            axes[1][column].text(0.5, 0.5, "no timings in this run", ha="center", transform=axes[1][column].transAxes)
    for ax in axes.flat:
        ax.set_ylabel("accuracy through generate() (%)")
        ax.set_ylim(-2, 102)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def density_axis(ax, ticker) -> None:
    ax.set_xlabel("measured prefill block density")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())  # the log axis' minor labels overlap
    ax.xaxis.set_major_locator(ticker.FixedLocator([0.03, 0.05, 0.1, 0.15, 0.3, 0.5, 1.0]))
    ax.xaxis.set_major_formatter(ticker.PercentFormatter(xmax=1.0, decimals=0))


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


if __name__ == "__main__":
    main()
