"""The real-model bench's speed part: what a user of ``torch.compile(model.forward, backend="dam")`` gets on
SmolLM2, against eager HF (SDPA) and Inductor, in one run on one GPU (issue 38).

- ``prefill``: median milliseconds of one prefill (``logits_to_keep=1``), every backend compiled once with
  ``dynamic=True``; for ours, which path each attention call took (``dam_compile.runtime_stats``: sparse, or dense
  below the measured crossover);
- ``generate``: the whole greedy ``generate()`` (prefill and ``new_tokens`` decode steps, the default cache);
- ``attention``: attention alone on the model's own Q/K/V (captured from an eager prefill), summed over the
  sparse layers: dense cuDNN SDPA, our default plan (``dam::dynamic_plan``), our kernel and FlexAttention on
  that identical plan.

Every length runs the model loaded for the longest one (its RoPE scaling; a timing does not depend on it): one
load and one compile per backend.
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
from dam_compile.kernels.ops import dense_attention
from dam_compile.kernels.plan import BlockSparsePlan
from dam_compile.kernels.reference import plan_density
from dam_compile.module_stack import AttentionCallMode
from dam_compile.passes.dense_layers import dense_layer_reason
from e2e_paths import generate
from prefill_timing import compiled_forward, prefill_ms

# compiled_forward's options (None: Inductor); eager runs the model as loaded. In order of value: a device call
# that runs out of time keeps eager and ours.
BACKENDS = {"eager": None, "dam_default": {}, "inductor": None}


def generate_ms(model, ids: torch.Tensor, new_tokens: int, runs: int = 3) -> float:
    """Median wall milliseconds of a greedy ``generate()`` of ``new_tokens`` tokens after one warm-up call."""
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return median(synced_wall_ms(lambda: generate(model, dict(inputs), new_tokens), runs))


def paths_taken() -> dict[str, int]:
    """The runtime path counts since the last reset, then a reset."""
    stats = dam_compile.runtime_stats()
    dam_compile.reset_runtime_stats()
    return stats


def end_to_end(model, prompts: dict[int, torch.Tensor], prefill_lengths: list[int], generate_lengths: list[int],
               backends: list[str], runs: int, new_tokens: int, deadline: float, log) -> dict[int, dict]:
    """Per length: eager, ours and Inductor prefill and ``generate()`` times (``backends``, in that order of
    value), and the path of our calls. Pieces that would start after ``deadline`` (``time.monotonic()``) are
    skipped and named in the row's ``skipped`` (a device call has a time limit; ``bench_real.py --merge`` joins a
    later part's pieces)."""
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
        options = BACKENDS.get(name)
        with contextlib.nullcontext() if name == "eager" else compiled_forward(model, options):
            for n in prefill_lengths:
                paths_taken()
                timed(n, f"{name}_ms", lambda: prefill_ms(model, prompts[n], runs))
                if name == "dam_default" and f"{name}_ms" in rows[n]:
                    rows[n]["dam_paths"] = paths_taken()
            for n in generate_lengths:
                timed(n, f"generate_{name}_ms", lambda: generate_ms(model, prompts[n], new_tokens))
    for row in rows.values():
        speedups(row)
        log("speed " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                                 if k != "dam_paths"))
        if "dam_paths" in row:
            log(f"  our attention calls at {row['length']}: {row['dam_paths']}")
    return rows


def speedups(row: dict) -> None:
    """The row's ratios: the best dense path (eager or Inductor, whichever ran faster) over ours, and eager's."""
    for prefix in ("", "generate_"):
        for key in ("best_dense", "speedup", "speedup_vs_eager"):
            row.pop(f"{prefix}{key}", None)
        dense = {k: row[f"{prefix}{k}_ms"] for k in ("eager", "inductor") if f"{prefix}{k}_ms" in row}
        if dense and f"{prefix}dam_default_ms" in row:
            best = min(dense, key=dense.get)
            row[f"{prefix}best_dense"] = best
            row[f"{prefix}speedup"] = dense[best] / row[f"{prefix}dam_default_ms"]
            if "eager" in dense:
                row[f"{prefix}speedup_vs_eager"] = dense["eager"] / row[f"{prefix}dam_default_ms"]


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
    config = DAMConfig()
    options = config.mask_options()
    with CaptureQKV(model) as capture:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    flex = torch.compile(flex_attention, dynamic=False)
    totals = {"dense_ms": 0.0, "plan_ms": 0.0, "ours_ms": 0.0, "flex_ms": 0.0}
    densities, layers = [], 0
    for name, a in capture.calls:
        if dense_layer_reason(name, config.dense_layers) is not None:
            continue
        q, k, v, scale = a["query"], a["key"], a["value"], a["scale"]
        gqa = k.shape[1] != q.shape[1]
        kwargs = dict(options.dynamic_plan_kwargs(True, scale), min_seq_len=0)
        make_plan = lambda: torch.ops.dam.dynamic_plan(q, k, **kwargs)  # noqa: E731
        lists = make_plan()
        plan = BlockSparsePlan(lists[0], lists[1], options.block_size, lists[2], lists[3])
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
