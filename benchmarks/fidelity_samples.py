"""The fidelity benchmark's held-out samples (seeds disjoint per use and from training's) and the two ways a
model's answer to one is scored: through greedy ``generate()`` and teacher-forced.
"""

from __future__ import annotations

import torch

import fidelity_tasks as ft

SEED_FAMILY = {"eval": 1, "check": 2, "calibration": 3, "holdout": 4}  # disjoint sample seeds per use


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
