"""Synthetic long-context retrieval tasks for the fidelity benchmark (RULER / LongEval style), on a small token
vocabulary with no tokenizer. Each sample is a prompt of exactly ``length`` tokens that ends in a question, and
the answer tokens a model must produce next.

- ``passkey``: one 5-digit passkey in filler;
- ``multikey``: several "NEEDLE key is dddd" lines with distractor keys; the question names one key;
- ``kv_lines``: the whole context is "LINE a b is ddd" lines (LongEval's line retrieval); the question names one
  line;
- ``var_track``: "VAR x = dddd" then a chain "VAR y = x", "VAR z = y" ...; the question asks the chain's end.

``depth`` (0 to 1) places the fact the answer depends on (the passkey, the asked needle or line, the chain's
first link) at that fraction of the context.
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


def passkey(length: int, depth: float, g: torch.Generator) -> Sample:
    key = _digits(5, g)
    question = [QUERY, PASSKEY, ANSWER]
    body = _fill(length - 1 - len(question), [(depth, [PASSKEY, *key, NEWLINE])], g)
    return _sample("passkey", body, question, key, depth)


def multikey(length: int, depth: float, g: torch.Generator, needles: int = 6) -> Sample:
    keys = _pick(NAMES, needles, g, distinct=True)
    values = [_digits(4, g) for _ in keys]
    depths = [depth] + torch.rand(needles - 1, generator=g).tolist()
    facts = [(d, [NEEDLE, k, IS, *v, NEWLINE]) for d, k, v in zip(depths, keys, values)]
    question = [QUERY, NEEDLE, keys[0], ANSWER]
    return _sample("multikey", _fill(length - 1 - len(question), facts, g), question, values[0], depth)


def kv_lines(length: int, depth: float, g: torch.Generator) -> Sample:
    line_len = 8  # LINE a b IS d d d NEWLINE
    question_len = 5
    count = (length - 1 - question_len) // line_len
    if count < 1:
        raise ValueError(f"length {length} holds no line")
    names = torch.randperm(len(NAMES) ** 2, generator=g)[:count].tolist()  # distinct (a, b) line ids
    ids = [(NAMES[n // len(NAMES)], NAMES[n % len(NAMES)]) for n in names]
    values = [_digits(3, g) for _ in ids]
    lines = [[LINE, a, b, IS, *v, NEWLINE] for (a, b), v in zip(ids, values)]
    target = min(count - 1, int(depth * count))
    pad = length - 1 - question_len - count * line_len  # leading filler makes the length exact
    body = _pick(FILLER, pad, g) + [t for line in lines for t in line]
    question = [QUERY, LINE, *ids[target], ANSWER]
    return _sample("kv_lines", body, question, values[target], depth)


def var_track(length: int, depth: float, g: torch.Generator, hops: int = 3, chains: int = 2) -> Sample:
    names = _pick(NAMES, hops * chains, g, distinct=True)
    facts, answers = [], []
    for c in range(chains):
        chain = names[c * hops:(c + 1) * hops]
        value = _digits(4, g)
        answers.append((chain[-1], value))
        start = depth if c == 0 else float(torch.rand((), generator=g)) * 0.5
        later = sorted(start + (1 - start) * x for x in torch.rand(hops - 1, generator=g).tolist())
        facts.append((start, [VAR, chain[0], EQUALS, *value, NEWLINE]))
        facts += [(d, [VAR, chain[i + 1], EQUALS, chain[i], NEWLINE]) for i, d in enumerate(later)]
    asked, value = answers[0]
    question = [QUERY, VAR, asked, ANSWER]
    return _sample("var_track", _fill(length - 1 - len(question), facts, g), question, value, depth)


GENERATORS = {"passkey": passkey, "multikey": multikey, "kv_lines": kv_lines, "var_track": var_track}


def make_sample(task: str, length: int, depth: float, seed: int) -> Sample:
    """One sample of ``task``: a prompt of exactly ``length`` tokens, deterministic in ``seed``."""
    if task not in GENERATORS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth!r}")
    return GENERATORS[task](length, depth, torch.Generator().manual_seed(seed))


def _sample(task: str, body: list[int], question: list[int], answer: list[int], depth: float) -> Sample:
    prompt = torch.tensor([BOS, *body, *question], dtype=torch.int64)
    return Sample(task, prompt, torch.tensor(answer, dtype=torch.int64), depth)


def training_batch(batch: int, length: int, seed: int) -> tuple[Tensor, Tensor]:
    """``(ids, labels)``, each ``[batch, length]``: prompts of ``length - A`` tokens followed by their answers
    (tasks and depths drawn uniformly); labels are -100 except on the answer tokens (loss on answers only)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, length), PAD, dtype=torch.int64)
    labels = torch.full((batch, length), -100, dtype=torch.int64)
    for b in range(batch):
        task = TASKS[int(torch.randint(len(TASKS), (), generator=g))]
        answer_len = 5 if task == "passkey" else 3 if task == "kv_lines" else 4
        sample = make_sample(task, length - answer_len, float(torch.rand((), generator=g)),
                             int(torch.randint(2**31, (), generator=g)))
        row = torch.cat([sample.prompt, sample.answer])
        ids[b] = row
        labels[b, -answer_len:] = sample.answer  # HF's loss shifts labels by one itself
    return ids, labels
