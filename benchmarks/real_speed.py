"""The real-model bench's speed part: what a user of ``torch.compile(model.forward, backend="dam")`` gets on
SmolLM2, against eager HF (SDPA) and Inductor, in one run on one GPU (issues 38 and 43).

- ``prefill``: median milliseconds of one prefill (``logits_to_keep=1``), every backend compiled once with
  ``dynamic=True``, called the way ``generate()`` calls it (``masked_<backend>_ms``: with
  ``attention_mask=ones``) and without the mask (``<backend>_ms``, the earlier files' rows); for ours, which
  path each attention call took (``dam_compile.runtime_stats``: sparse, or dense below the measured crossover);
- ``generate``: the whole greedy ``generate()`` (the default cache, ``attention_mask=ones``) of one token
  (``generate1_``: the prefill as generate() runs it), ``new_tokens`` (``generate_``) and ``LONG_ANSWER``
  tokens (``generate256_``); ``token_<backend>_ms`` = (generate - generate1) / (new_tokens - 1), the time of one
  generated token;
- ``attention``: attention alone on the model's own Q/K/V (captured from an eager prefill), summed over the
  sparse layers: dense cuDNN SDPA, our default plan (``dam::dynamic_plan``), our kernel and FlexAttention on
  that identical plan.

Backends: ``eager`` (the model as loaded), ``dam_default`` and ``inductor`` (``torch.compile``'s default mode),
``dam_ro`` and ``inductor_ro`` (``mode="reduce-overhead"``: CUDA graphs). Every length runs the model loaded
for the longest one (its RoPE scaling; a timing does not depend on it): one load and one compile per backend.
"""

from __future__ import annotations

import contextlib
import time
from statistics import median
from typing import Any

import torch
from torch.nn.attention.flex_attention import flex_attention

import dam_compile
from bench_common import bench_ms, synced_wall_ms
from bench_kernel import flex_block_mask
from dam_compile.config import DAMConfig
from dam_compile.ops.attention import dense_attention
from dam_compile.ops.dispatch import call_path
from dam_compile.plan.reference import plan_density
from dam_compile.module_stack import AttentionCallMode
from dam_compile.reference_mode import plan_call_for
from e2e_paths import generate
from prefill_timing import compiled_forward, prefill_ms

# name -> (compiled_forward's options (None: Inductor), torch.compile mode); eager runs the model as loaded.
# In order of value: a device call that runs out of time keeps eager and ours.
BACKENDS: dict[str, tuple[dict | None, str | None] | None] = {
    "eager": None, "dam_default": ({}, None), "inductor": (None, None),
    "dam_ro": ({}, "reduce-overhead"), "inductor_ro": (None, "reduce-overhead"),
}
DEFAULT_BACKENDS = ("eager", "dam_default", "inductor")
DENSE = {"eager": None, "inductor": None, "inductor_ro": None}  # the dense paths a user could run instead
# ours -> (the dense path in the same compile mode, the field of our time per token over its)
OURS = {"dam_default": ("inductor", "token_ratio"), "dam_ro": ("inductor_ro", "token_ratio_ro")}
LONG_ANSWER = 256  # tokens of the long generate()
# Timed quantities: key prefix -> what a row says of it.
MEASURES = {"": "prefill without attention_mask", "masked_": "prefill with attention_mask=ones",
            "generate1_": "generate() of 1 token", "generate_": "generate() of new_tokens tokens",
            "generate256_": f"generate() of {LONG_ANSWER} tokens"}


def generate_ms(model, ids: torch.Tensor, new_tokens: int, runs: int = 3) -> float:
    """Median wall milliseconds of a greedy ``generate()`` of ``new_tokens`` tokens after one warm-up call."""
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return median(synced_wall_ms(lambda: generate(model, dict(inputs), new_tokens), runs))


def paths_taken() -> dict[str, int]:
    """The runtime path counts since the last reset, then a reset."""
    stats = dam_compile.runtime_stats()
    dam_compile.reset_runtime_stats()
    return stats


@contextlib.contextmanager
def backend_forward(model, name: str):
    """``model.forward`` as backend ``name`` runs it (see ``BACKENDS``)."""
    spec = BACKENDS[name]
    with contextlib.nullcontext() if spec is None else compiled_forward(model, *spec):
        yield


def end_to_end(model, prompts: dict[int, torch.Tensor], prefill_lengths: list[int], generate_lengths: list[int],
               backends: list[str], runs: int, new_tokens: int, deadline: float, log,
               long_answer: bool = True, progress=None) -> dict[int, dict]:
    """Per length and backend (``backends``, in that order of value): prefill times with and without the mask,
    ``generate()`` times of 1, ``new_tokens`` and (``long_answer``) ``LONG_ANSWER`` tokens, and the path of our
    calls. Pieces that would start after ``deadline`` (``time.monotonic()``) are skipped and named in the row's
    ``skipped`` (a device call has a time limit; ``bench_real.py --merge`` joins a later part's pieces).
    ``progress(rows)`` is called after each backend (the bench writes its file then)."""
    rows: dict[int, dict] = {n: {"length": n} for n in sorted({*prefill_lengths, *generate_lengths})}

    def timed(n: int, key: str, measure) -> None:
        if time.monotonic() > deadline:
            rows[n].setdefault("skipped", []).append(key)
            return
        try:
            rows[n][key] = measure()
        except torch.OutOfMemoryError as err:
            rows[n][key.replace("_ms", "_error")] = str(err).split("\n")[0][:160]

    for name in backends:
        with backend_forward(model, name):  # what users run first; the unmasked prefill (another graph) last
            for n in generate_lengths:
                timed(n, f"generate1_{name}_ms", lambda: generate_ms(model, prompts[n], 1))
                timed(n, f"generate_{name}_ms", lambda: generate_ms(model, prompts[n], new_tokens))
                if long_answer:
                    timed(n, f"generate256_{name}_ms", lambda: generate_ms(model, prompts[n], LONG_ANSWER, runs=2))
            for n in prefill_lengths:
                paths_taken()
                timed(n, f"masked_{name}_ms", lambda: prefill_ms(model, prompts[n], runs, masked=True))
                if name.startswith("dam") and f"masked_{name}_ms" in rows[n]:
                    rows[n][f"{name}_paths"] = paths_taken()
            for n in prefill_lengths:
                timed(n, f"{name}_ms", lambda: prefill_ms(model, prompts[n], runs))
        for row in rows.values():
            speedups(row, new_tokens)
        if progress is not None:
            progress(rows)
    for row in rows.values():  # speedups() ran after each backend
        log("speed " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                                 if not k.endswith("_paths")))
        for name in backends:
            if f"{name}_paths" in row:
                log(f"  {name}'s attention calls at {row['length']}: {row[f'{name}_paths']}")
    return rows


def speedups(row: dict, new_tokens: int | None = None) -> None:
    """The row's derived numbers: per generated token (``token_<backend>_ms``, from ``generate1_`` and
    ``generate_`` with ``new_tokens``; kept when ``None``), and for each measure the best dense path (eager or
    Inductor in either mode, whichever ran faster) over ours (``<measure>speedup``) and eager's over ours; our
    time per token over Inductor's in the same compile mode (``token_ratio``, ``token_ratio_ro``)."""
    if new_tokens is not None:
        for name in BACKENDS:
            first, whole = row.get(f"generate1_{name}_ms"), row.get(f"generate_{name}_ms")
            if first is not None and whole is not None and new_tokens > 1:
                row[f"token_{name}_ms"] = (whole - first) / (new_tokens - 1)
    for prefix in (*MEASURES, "token_"):
        for key in ("best_dense", "speedup", "speedup_vs_eager"):
            row.pop(f"{prefix}{key}", None)
        dense = {k: row[f"{prefix}{k}_ms"] for k in DENSE if f"{prefix}{k}_ms" in row}
        if dense and f"{prefix}dam_default_ms" in row:
            best = min(dense, key=dense.get)
            row[f"{prefix}best_dense"] = best
            row[f"{prefix}speedup"] = dense[best] / row[f"{prefix}dam_default_ms"]
            if "eager" in dense:
                row[f"{prefix}speedup_vs_eager"] = dense["eager"] / row[f"{prefix}dam_default_ms"]
    for ours, (theirs, key) in OURS.items():
        row.pop(key, None)
        if f"token_{ours}_ms" in row and f"token_{theirs}_ms" in row:
            row[key] = row[f"token_{ours}_ms"] / row[f"token_{theirs}_ms"]


class CaptureQKV(AttentionCallMode):
    """Keeps every prefill SDPA call's query, key, value and scale, by module name, and lets it run."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def on_attention(self, name: str, a: dict[str, Any]):
        self.calls.append((name, {k: a[k] for k in ("query", "key", "value", "scale")}))
        return None


@torch.no_grad()
def attention_only(model, ids: torch.Tensor, log) -> dict:
    """Attention alone on the model's own Q/K/V at ``ids``' length, summed over the sparse layers (the first
    ``dense_layers`` run dense in the product and are left out): milliseconds of dense cuDNN SDPA, our plan,
    our kernel on it and FlexAttention on the identical plan, and the plans' mean density."""
    config = DAMConfig(min_seq_len=0)  # the default plan at every length
    with CaptureQKV(model) as capture:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    flex = torch.compile(flex_attention, dynamic=False)
    totals = {"dense_ms": 0.0, "plan_ms": 0.0, "ours_ms": 0.0, "flex_ms": 0.0}
    densities, layers = [], 0
    for name, a in capture.calls:
        q, k, v, scale = a["query"], a["key"], a["value"], a["scale"]
        if call_path(config, name, q, k, runner="plan")[0] == "dense":
            continue
        gqa = k.shape[1] != q.shape[1]
        call = plan_call_for(config, q, True, scale)
        make_plan = lambda: call.run(q, k)  # noqa: E731
        plan = call.plan(make_plan())
        mask = flex_block_mask(plan, q.shape[-2], q.shape[1])
        totals["dense_ms"] += bench_ms(lambda: dense_attention(q, k, v, None, scale, True, gqa))
        totals["plan_ms"] += bench_ms(make_plan)
        totals["ours_ms"] += bench_ms(lambda: dam_compile.sparse_attention(q, k, v, plan, scale=scale, is_causal=True,
                                                                           enable_gqa=gqa))
        totals["flex_ms"] += bench_ms(lambda: flex(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa))
        densities.append(plan_density(plan, q.shape[-2], k.shape[-2], True))
        layers += 1
    row = {"length": ids.shape[-1], "layers": layers, **totals, "density": sum(densities) / max(1, layers),
           "speedup_kernel": totals["dense_ms"] / totals["ours_ms"],
           "speedup_with_plan": totals["dense_ms"] / (totals["ours_ms"] + totals["plan_ms"]),
           "vs_flex": totals["flex_ms"] / totals["ours_ms"],
           "plan_share_of_dense": totals["plan_ms"] / totals["dense_ms"]}
    log(f"attention only at {row['length']} ({layers} sparse layers, density {row['density']:.3f}): dense "
        f"{totals['dense_ms']:.2f} ms, plan {totals['plan_ms']:.2f}, ours {totals['ours_ms']:.2f} "
        f"({row['speedup_kernel']:.2f}x; {row['speedup_with_plan']:.2f}x with the plan), Flex {totals['flex_ms']:.2f}")
    return row
