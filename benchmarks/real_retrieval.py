"""Retrieval on the real model after a brief fine-tune: does the default keep a needle that full attention finds?

SmolLM2-135M-Instruct answers passkey prompts 0-12% of the time as it ships (``shared/FACTS.md``), so a
retrieval comparison first teaches it the task, in the run:

- ``passkey``: one sentence "The pass key is 38291. Remember it. 38291 is the pass key." somewhere in natural
  text (the bench's documents), then "What is the pass key? The pass key is" and the five digits to answer;
- ``kv``: six sentences "The code for <word> is 38291." at random places, then the question names one word.

The prompt is natural text with the facts cut in at token positions (``depth``: the asked fact's place as a share
of the context); its ids are the tokenizer's ids of the pieces, joined, so training and evaluation see the same
answer tokens. Training fills from the second half of each document's tokens, evaluation from the first.

:func:`fine_tune` trains a float32 copy (bf16 autocast on CUDA; loss on the answer tokens only, several lengths
up to the longest evaluated one) until full attention answers every task at every length at least
``TARGET_ACCURACY`` of the time, teacher-forced on check samples (all answer tokens top-1: what greedy decoding
produces), or a step or time limit passes. :func:`evaluate` then scores each variant through greedy
``generate()`` (the prefill and every decode step through the variant) on held-out prompts at evenly spread
depths, in the model's bf16 as a user runs it.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

TASKS = ("passkey", "kv")
TARGET_ACCURACY = 0.95  # full attention's accuracy the fine-tune must reach before the comparison means anything
KV_FACTS = 6
WORDS = ("apple", "river", "candle", "garden", "silver", "window", "forest", "pencil", "rocket", "harbor", "violin",
         "meadow", "lantern", "castle", "marble", "ticket", "falcon", "pepper", "anchor", "blanket", "compass",
         "dragon", "engine", "feather", "glacier", "helmet", "island", "jacket", "kettle", "ladder", "mirror",
         "needle", "orchid", "parrot", "quartz", "saddle", "tunnel", "velvet", "walnut", "zipper", "basket",
         "cactus", "donkey", "empire", "fossil", "goblet", "hammer", "igloo")


@dataclass(frozen=True)
class RetrievalSample:
    task: str
    prompt: Tensor  # int64 [length]
    answer: Tensor  # int64 [A]
    depth: float


@dataclass(frozen=True)
class TrainingPlan:
    """How long the fine-tune may run: ``lengths`` (prompt lengths drawn per step, ``tokens_per_step`` tokens a
    step), at most ``max_steps`` steps or ``seconds``; full attention checked every ``check_every`` steps on
    ``check_samples`` prompts per task and evaluated length."""

    lengths: tuple[int, ...]
    max_steps: int
    seconds: float
    tokens_per_step: int = 16384
    lr: float = 1e-4
    warmup_steps: int = 20
    check_every: int = 50
    check_samples: int = 16


class PromptMaker:
    """Builds retrieval prompts of exact token lengths from a tokenizer's ``encode`` (text -> ids, no special
    tokens) and pools of natural-text ids to fill with."""

    def __init__(self, encode: Callable[[str], list[int]], train_pool: Tensor, eval_pool: Tensor) -> None:
        self.encode = encode
        self.pools = {"train": train_pool, "eval": eval_pool}

    def _facts(self, task: str, g: torch.Generator) -> tuple[list[list[int]], list[int], list[int]]:
        """``(facts, question, answer)`` ids; ``facts[0]`` is the asked one."""
        digits = "".join(str(d) for d in torch.randint(10, (5,), generator=g).tolist())
        if task == "passkey":
            fact = f" The pass key is {digits}. Remember it. {digits} is the pass key."
            return [self.encode(fact)], self.encode(" What is the pass key? The pass key is"), self.encode(" " + digits)
        if task != "kv":
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        words = [WORDS[i] for i in torch.randperm(len(WORDS), generator=g)[:KV_FACTS].tolist()]
        codes = [digits] + ["".join(str(d) for d in torch.randint(10, (5,), generator=g).tolist())
                            for _ in words[1:]]
        facts = [self.encode(f" The code for {w} is {c}.") for w, c in zip(words, codes)]
        question = self.encode(f" What is the code for {words[0]}? The code for {words[0]} is")
        return facts, question, self.encode(" " + digits)

    def sample(self, task: str, length: int, depth: float, seed: int, split: str = "eval") -> RetrievalSample:
        """A prompt of exactly ``length`` tokens whose asked fact sits at ``depth`` of the filler (the other facts
        at random depths), deterministic in ``seed``."""
        g = torch.Generator().manual_seed(seed)
        facts, question, answer = self._facts(task, g)
        room = length - len(question) - sum(len(f) for f in facts)
        pool = self.pools[split]
        if room < 1 or pool.numel() < room:
            raise ValueError(f"a {task} prompt of {length} tokens cannot be built (filler room {room}, "
                             f"pool {pool.numel()} tokens)")
        start = int(torch.randint(pool.numel() - room + 1, (), generator=g))
        filler = pool[start:start + room].tolist()
        depths = [depth] + torch.rand(len(facts) - 1, generator=g).tolist()
        body, taken = [], 0
        for d, fact in sorted(zip(depths, facts), key=lambda f: f[0]):
            cut = max(taken, min(room, round(d * room)))
            body += filler[taken:cut] + fact
            taken = cut
        prompt = torch.tensor(body + filler[taken:] + question, dtype=torch.int64)
        return RetrievalSample(task, prompt, torch.tensor(answer, dtype=torch.int64), depth)

    def held_out(self, task: str, length: int, count: int) -> list[RetrievalSample]:
        """``count`` evaluation prompts, the asked fact at evenly spread depths (5% to 95%)."""
        return [self.sample(task, length, 0.05 + 0.9 * i / max(1, count - 1),
                            seed=length * 1000 + i + 7919 * (task == "kv")) for i in range(count)]


# ---- the fine-tune ---------------------------------------------------------------------------------------------

def _answer_logits(model, ids: Tensor, answer_len: int) -> Tensor:
    """Logits ``[B, A, V]`` at the positions that predict the last ``answer_len`` tokens of ``ids [B, L]``."""
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
    return model.lm_head(hidden[:, -answer_len - 1:-1])


def _batch(samples: list[RetrievalSample], device) -> tuple[Tensor, Tensor]:
    """``(prompt + answer ids [B, L + A], answer ids [B, A])``; the samples share a task and length."""
    ids = torch.stack([torch.cat([s.prompt, s.answer]) for s in samples]).to(device)
    return ids, torch.stack([s.answer for s in samples]).to(device)


@torch.no_grad()
def teacher_forced_accuracy(model, samples: list[RetrievalSample], batch: int) -> float:
    """Share of ``samples`` whose every answer token is the model's top-1 with the answer so far given: exactly
    what greedy decoding answers."""
    hits = 0
    for start in range(0, len(samples), batch):
        ids, answer = _batch(samples[start:start + batch], next(model.parameters()).device)
        with _autocast(ids.device):
            logits = _answer_logits(model, ids, answer.shape[1])
        hits += int((logits.argmax(-1) == answer).all(-1).sum())
    return hits / len(samples)


def _autocast(device: torch.device):
    """bf16 autocast on CUDA; the CPU runs float32 as it is."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def fine_tune(model, maker: PromptMaker, eval_lengths: list[int], plan: TrainingPlan, log) -> dict:
    """Train ``model`` (float32, in place) on both tasks until full attention answers each at each of
    ``eval_lengths`` at least ``TARGET_ACCURACY`` (teacher-forced, on check prompts never trained on), or the
    plan's step or time limit passes. Returns the training record (losses, checks, steps, seconds, reached)."""
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=plan.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / plan.warmup_steps))
    checks = {(t, n): [maker.sample(t, n, (i + 0.5) / plan.check_samples, seed=10_000_000 + n + 1000 * i + 7 * ti)
                       for i in range(plan.check_samples)]
              for ti, t in enumerate(TASKS) for n in eval_lengths}
    g = torch.Generator().manual_seed(0)
    record = {"plan": {k: getattr(plan, k) for k in plan.__dataclass_fields__}, "losses": [], "checks": []}
    start, step = time.monotonic(), 0

    def check() -> bool:
        """Full attention's accuracy on the check prompts now, recorded; whether it reached the target."""
        model.eval()
        accuracy = {f"{t}@{n}": teacher_forced_accuracy(model, s, batch=max(1, plan.tokens_per_step // n))
                    for (t, n), s in checks.items()}
        record["checks"].append({"step": step, "seconds": round(time.monotonic() - start, 1), **accuracy})
        log(f"retrieval fine-tune step {step}: full attention "
            + ", ".join(f"{k} {v:.2f}" for k, v in accuracy.items()))
        record["reached"] = min(accuracy.values()) >= TARGET_ACCURACY
        model.train()
        return record["reached"]

    if hasattr(model, "gradient_checkpointing_enable"):  # activations of one layer at a time: 32K prompts fit
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reached = check()  # as the model ships
    while not reached and step < plan.max_steps and time.monotonic() - start < plan.seconds:
        length = plan.lengths[int(torch.randint(len(plan.lengths), (), generator=g))]
        task = TASKS[step % len(TASKS)]
        samples = [maker.sample(task, length, float(torch.rand((), generator=g)),
                                seed=int(torch.randint(2**31 - 1, (), generator=g)), split="train")
                   for _ in range(max(1, plan.tokens_per_step // length))]
        ids, answer = _batch(samples, device)
        with _autocast(device):
            logits = _answer_logits(model, ids, answer.shape[1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), answer.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        step += 1
        if step % 10 == 0:
            record["losses"].append({"step": step, "loss": round(loss.item(), 4)})
        if step % plan.check_every == 0 or step == plan.max_steps:
            reached = check()
    if hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()
    model.eval()
    record.update(steps=step, seconds=round(time.monotonic() - start, 1))
    return record


# ---- through generate() ----------------------------------------------------------------------------------------

@torch.no_grad()
def generate_accuracy(model, samples: list[RetrievalSample], batch: int) -> list[bool]:
    """Per sample: does greedy ``generate()`` of the answer's length give exactly the answer? Prompts of one
    length run ``batch`` at a time (unpadded)."""
    hits = []
    device = next(model.parameters()).device
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        ids = torch.stack([s.prompt for s in chunk]).to(device)
        new = chunk[0].answer.numel()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=model.config.eos_token_id)
        answers = torch.stack([s.answer for s in chunk]).to(device)
        hits += (out[:, ids.shape[1]:] == answers).all(-1).tolist()
    return hits


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a hit rate, in points: how far ``samples`` per cell can resolve a gap."""
    if n == 0:
        return (math.nan, math.nan)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (round(100 * (centre - half), 2), round(100 * (centre + half), 2))
