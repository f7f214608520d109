"""Synthetic long-context retrieval tasks for the fidelity benchmark (RULER / LongEval style), on a small token
vocabulary with no tokenizer. Each sample is a prompt of exactly ``length`` tokens that ends in a question, and
the answer tokens a model must produce next.

- ``passkey``: one 5-digit passkey in filler;
- ``multikey``: several "NEEDLE key is dddd" lines with distractor keys; the question names one key;
- ``kv_lines``: the whole context is "LINE a b is ddd" lines (LongEval's line retrieval); the question names one
  line;
- ``var_track``: "VAR x = dddd" then a chain "VAR y = x", "VAR z = y" ...; the question asks the chain's end.

``depth`` (0 to 1) places the fact the answer depends on (the passkey, the asked needle or line, the chain's
first link) at that fraction of the context. A context can answer several questions (every needle, many lines,
both chains): training asks them all after one another, which gives the loss many answers per sequence, as
multi-query associative recall does; evaluation asks the first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

PAD, BOS, NEWLINE, IS, QUERY, ANSWER, PASSKEY, LINE, VAR, EQUALS, NEEDLE = range(11)
DIGITS = range(16, 26)
NAMES = range(32, 288)  # identifiers: keys, line ids, variable names
FILLER = range(288, 512)
VOCAB = 512
TASKS = ("passkey", "multikey", "kv_lines", "var_track")
QUESTION_LEN = {"passkey": 3, "multikey": 4, "kv_lines": 5, "var_track": 4}
ANSWER_LEN = {"passkey": 5, "multikey": 4, "kv_lines": 3, "var_track": 4}
MAX_QUESTIONS = {"passkey": 1, "multikey": 6, "kv_lines": 16, "var_track": 2}

QA = tuple[list[int], list[int]]  # (question, answer)


@dataclass(frozen=True)
class Sample:
    task: str
    prompt: Tensor  # int64 [length], starts with BOS, ends with ANSWER
    answer: Tensor  # int64 [A]
    depth: float


def _pick(choices: range, n: int, g: torch.Generator, distinct: bool = False) -> list[int]:
    if distinct:
        return [choices[i] for i in torch.randperm(len(choices), generator=g)[:n].tolist()]
    return [choices[i] for i in torch.randint(len(choices), (n,), generator=g).tolist()]


def _digits(n: int, g: torch.Generator) -> list[int]:
    return _pick(DIGITS, n, g)


def _fill(body_len: int, facts: list[tuple[float, list[int]]], g: torch.Generator) -> list[int]:
    """``body_len`` filler tokens with each fact inserted whole at its depth (in the given order)."""
    room = body_len - sum(len(f) for _, f in facts)
    if room < 0:
        raise ValueError(f"a context of {body_len} tokens cannot hold the facts ({body_len - room} tokens)")
    filler = _pick(FILLER, room, g)
    out, taken = [], 0
    for depth, fact in sorted(facts, key=lambda f: f[0]):
        cut = max(taken, min(room, round(depth * room)))
        out += filler[taken:cut] + fact
        taken = cut
    return out + filler[taken:]


def passkey(body_len: int, depth: float, g: torch.Generator, questions: int) -> tuple[list[int], list[QA]]:
    key = _digits(5, g)
    return _fill(body_len, [(depth, [PASSKEY, *key, NEWLINE])], g), [([QUERY, PASSKEY, ANSWER], key)]


def multikey(body_len: int, depth: float, g: torch.Generator, questions: int, needles: int = 6):
    keys = _pick(NAMES, needles, g, distinct=True)
    values = [_digits(4, g) for _ in keys]
    depths = [depth] + torch.rand(needles - 1, generator=g).tolist()
    facts = [(d, [NEEDLE, k, IS, *v, NEWLINE]) for d, k, v in zip(depths, keys, values)]
    body = _fill(body_len, facts, g)
    asked = [0] + (1 + torch.randperm(needles - 1, generator=g)).tolist()
    return body, [([QUERY, NEEDLE, keys[i], ANSWER], values[i]) for i in asked[:questions]]


def kv_lines(body_len: int, depth: float, g: torch.Generator, questions: int):
    line_len = 8  # LINE a b IS d d d NEWLINE
    count = body_len // line_len
    if count < 1:
        raise ValueError(f"a context of {body_len} tokens holds no line")
    names = torch.randperm(len(NAMES) ** 2, generator=g)[:count].tolist()  # distinct (a, b) line ids
    ids = [(NAMES[n // len(NAMES)], NAMES[n % len(NAMES)]) for n in names]
    values = [_digits(3, g) for _ in ids]
    lines = [[LINE, a, b, IS, *v, NEWLINE] for (a, b), v in zip(ids, values)]
    target = min(count - 1, int(depth * count))
    body = _pick(FILLER, body_len - count * line_len, g) + [t for line in lines for t in line]  # exact length
    others = [i for i in torch.randperm(count, generator=g).tolist() if i != target]
    return body, [([QUERY, LINE, *ids[i], ANSWER], values[i]) for i in ([target] + others)[:questions]]


def var_track(body_len: int, depth: float, g: torch.Generator, questions: int, hops: int = 3, chains: int = 2):
    names = _pick(NAMES, hops * chains, g, distinct=True)
    facts, asked = [], []
    for c in range(chains):
        chain = names[c * hops:(c + 1) * hops]
        value = _digits(4, g)
        asked.append(([QUERY, VAR, chain[-1], ANSWER], value))
        start = depth if c == 0 else float(torch.rand((), generator=g)) * 0.5
        later = sorted(start + (1 - start) * x for x in torch.rand(hops - 1, generator=g).tolist())
        facts.append((start, [VAR, chain[0], EQUALS, *value, NEWLINE]))
        facts += [(d, [VAR, chain[i + 1], EQUALS, chain[i], NEWLINE]) for i, d in enumerate(later)]
    return _fill(body_len, facts, g), asked[:questions]


GENERATORS = {"passkey": passkey, "multikey": multikey, "kv_lines": kv_lines, "var_track": var_track}


def _context(task: str, body_len: int, depth: float, seed: int, questions: int) -> tuple[list[int], list[QA]]:
    if task not in GENERATORS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth!r}")
    return GENERATORS[task](body_len, depth, torch.Generator().manual_seed(seed), questions)


def make_sample(task: str, length: int, depth: float, seed: int) -> Sample:
    """One sample of ``task``: a prompt of exactly ``length`` tokens, deterministic in ``seed``."""
    body, [(question, answer)] = _context(task, length - 1 - QUESTION_LEN.get(task, 0), depth, seed, questions=1)
    prompt = torch.tensor([BOS, *body, *question], dtype=torch.int64)
    return Sample(task, prompt, torch.tensor(answer, dtype=torch.int64), depth)


def training_batch(batch: int, length: int, seed: int, questions: int = 8) -> tuple[Tensor, Tensor]:
    """``(ids, labels)``, each ``[batch, length]``: a context followed by up to ``questions`` questions, each with
    its answer (tasks and depths drawn uniformly); labels are -100 except on the answer tokens (loss on answers
    only; HF's loss shifts labels by one itself)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, length), PAD, dtype=torch.int64)
    labels = torch.full((batch, length), -100, dtype=torch.int64)
    for b in range(batch):
        task = TASKS[int(torch.randint(len(TASKS), (), generator=g))]
        asked = min(questions, MAX_QUESTIONS[task])
        body_len = length - 1 - asked * (QUESTION_LEN[task] + ANSWER_LEN[task])
        body, qas = _context(task, body_len, float(torch.rand((), generator=g)),
                             int(torch.randint(2**31, (), generator=g)), asked)
        row, answer_at = [BOS, *body], []
        for question, answer in qas:
            row += question
            answer_at += range(len(row), len(row) + len(answer))
            row += answer
        ids[b, :len(row)] = torch.tensor(row)  # a short line context asks fewer: PAD after, no loss there
        labels[b, answer_at] = ids[b, answer_at]
    return ids, labels
