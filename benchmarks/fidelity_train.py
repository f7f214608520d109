"""Training the fidelity benchmark's stand-in model: the Llama-shaped config, the curriculum on the synthetic
tasks, the recipe that keys the saved weights, and further rounds until full attention passes the quality check
(or the allowed rounds are spent); weights are loaded, continued or trained from scratch as the saved ones say.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import sys
import time
from statistics import mean
from typing import Callable

import torch
from tqdm import tqdm

import fidelity_tasks as ft
from bench_common import int_list
from fidelity_check import QUALITY_THRESHOLD, describe_check, quality_check
from fidelity_weights import load_weights, save_weights


def model_config(smoke: bool):
    import transformers

    size = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
            if smoke else dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8))
    return transformers.LlamaConfig(
        vocab_size=ft.VOCAB, num_key_value_heads=2, max_position_embeddings=65536, rope_theta=500000.0,
        attn_implementation="sdpa", **size)


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
