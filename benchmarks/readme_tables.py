"""Regenerate the benchmark tables from ``benchmarks/results/*.json`` (never typed by hand).

    python benchmarks/readme_tables.py            # rewrites the marked sections in place
    python benchmarks/readme_tables.py --check    # exit 1 if a marked section is out of date

The full tables live in ``benchmarks/README.md``; the project README carries only the short headline table.
Each sits between ``<!-- bench:<name>:start -->`` and ``<!-- bench:<name>:end -->`` markers (:data:`FILES`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

from e2e_paths import PATHS

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

KERNEL_TARGETS = {  # ../shared/RESULTS.md, kernel section; a file from before a field existed has no row for it
    "dense_vs_cudnn_32k": ">= 0.95",
    "dense_vs_cudnn_128k": ">= 0.95",
    "sparse_vs_cudnn_32k": "<= 1.3",
    "sparse_vs_cudnn_128k": "<= 1.15",
    "vs_flex_min": ">= 1.25",
    "host_us_8k": "<= 40",
    "decode_bw_fraction_128k": ">= 0.7",
    "sparse_efficiency_128k": "reported (earlier versions' field)",
    "vs_flex_128k": "reported (earlier versions' field)",
}


def kernel_table(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"{result['device']}, torch {result['torch']}, Triton {result['triton']}, {result['date'][:10]}; "
        f"B={cfg['batch']} H={cfg['heads']} KVH={cfg['kv_heads']} D={cfg['head_dim']} {cfg['dtype']} causal, "
        f"plan block {cfg['block_size']}. Command: `{_portable(result['command'])}`.",
    ]
    both_paths = any("portable_ms" in r for r in result["rows"])  # files from before the Hopper path have one
    if result["rows"]:
        lines += ["", "| N | density | ours ms (TFLOP/s) | FlexAttention ms, same plan | cuDNN SDPA ms (TFLOP/s) "
                      "| flash SDPA ms | vs Flex | vs cuDNN | ours / (density x our dense) |"
                      + (" path | portable Triton kernel ms | Hopper path, one CTA per tile ms |" if both_paths else ""),
                  "|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if both_paths else "")]
    for r in result["rows"]:
        efficiency = r["time_over_density_x_dense"]
        lines.append(
            f"| {r['seq_len'] // 1024}K | {r['density']:.3f} | {r['ours_ms']:.3f} ({r['ours_tflops']:.0f}) "
            f"| {r['flex_ms']:.3f} | {r['cudnn_ms']:.3f} ({r['cudnn_tflops']:.0f}) | {r['flash_ms']:.3f} "
            f"| {r['speedup_vs_flex']:.2f}x | {r['speedup_vs_cudnn']:.2f}x "
            f"| {'-' if efficiency is None else f'{efficiency:.2f}'} |"
            + (f" {r['path']} | {r['portable_ms']:.3f} | {_ms(r.get('per_tile_grid_ms'))} |" if both_paths else "")
        )
    if result.get("items"):
        lines += ["", *item_cost_table(result["items"])]
    if result.get("host"):
        host = result["host"]
        lines += ["", f"Host time through `torch.ops.dam.sparse_attention` at {host['seq_len'] // 1024}K, density "
                      f"{host['density']}: {host['host_us']:.1f} us of CPU per call"
                      + (f" (the least of {len(host['host_us_loops'])} loops; their median "
                         f"{host['host_us_median']:.1f} us)" if "host_us_median" in host else "")
                      + f"; its GPU time: {host['gpu_us']:.0f} us."]
    if result.get("decode"):
        eager = "ours_eager_ms" in result["decode"][0]  # CUDA-graph kernel times, with the eager call's beside
        dirty = "ours_dirty_l2_ms" in result["decode"][0]  # and the time after a flush that leaves L2 dirty
        ceiling = "read_ceiling_ms" in result["decode"][0]  # and a kernel that only reads the kept blocks
        lines += ["", "| decode: KV | plan | density | ours us | kept K/V GB/s | / copy bandwidth "
                      "| flash SDPA dense us | its fraction |"
                      + (" reading the kept blocks alone, us (/ copy) |" if ceiling else "")
                      + (" ours / SDPA after a dirtying flush, us |" if dirty else "")
                      + (" ours, eager call us |" if eager else ""),
                  "|---|---|---|---|---|---|---|---|" + ("---|" if ceiling else "") + ("---|" if dirty else "")
                  + ("---|" if eager else "")]
        for r in result["decode"]:
            lines.append(f"| {r['kv_len'] // 1024}K | {r.get('plan', 'random')} | {r['density']:.3f} | "
                         f"{r['ours_ms'] * 1e3:.1f} | {r['achieved_gbs']:.0f} | {r['bw_fraction']:.2f} | "
                         f"{r['sdpa_flash_dense_ms'] * 1e3:.1f} | {r['sdpa_dense_bw_fraction']:.2f} |"
                         + (f" {r['read_ceiling_ms'] * 1e3:.1f} ({r['read_ceiling_fraction']:.2f}) |"
                            if ceiling else "")
                         + (f" {r['ours_dirty_l2_ms'] * 1e3:.1f} / {r['sdpa_flash_dense_dirty_l2_ms'] * 1e3:.1f} |"
                            if dirty else "")
                         + (f" {r['ours_eager_ms'] * 1e3:.1f} |" if eager else ""))
    lines += ["", *headline_rows(result["summary"], KERNEL_TARGETS, lambda value, note: f"{value}")]
    return "\n".join(lines)


def item_cost_table(items: dict) -> list[str]:
    """The items part: times per fixed blocks-per-row plan, and the fitted cost per work item and per block."""
    n = items["rows"][0]["seq_len"]
    lines = [f"| items: N={n // 1024}K, blocks per row | work items | kept blocks | ours ms | FlexAttention ms |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['blocks_per_row']} | {r['items']} | {r['kept_blocks']} | {r['ours_ms']:.3f} | {r['flex_ms']:.3f} |"
              for r in items["rows"]]
    fit = items["fit"]
    lines += ["", f"Fitted (least squares of time over kept blocks, times the {items['sms']} SMs): "
              + "; ".join(f"{label} {fit[name]['per_item_sm_us']:.2f} SM-us per work item and "
                          f"{fit[name]['per_block_sm_us']:.2f} per kept block"
                          for name, label in (("ours", "ours"), ("flex", "FlexAttention"))) + "."]
    return lines


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def headline_rows(summary: dict, targets: dict[str, str], shown: Callable[[Any, str], str]) -> list[str]:
    """The ``summary`` fields against their targets: a value as ``shown(value, its note)`` renders it, a null one
    as not measured with its reason; a field the file's summary predates (an older file) has no row."""
    lines = ["| headline (`summary`) | measured | target |", "|---|---|---|"]
    for field, target in targets.items():
        if field not in summary:
            continue
        note = summary.get("notes", {}).get(field, "")
        text = ("not measured" + (f": {note}" if note else "") if summary[field] is None
                else shown(summary[field], note))
        lines.append(f"| `{field}` | {text} | {target} |")
    return lines


MASKGEN_TARGETS = {"overhead_vs_dense_32k": "<= 0.05", "overhead_vs_dense_128k": "<= 0.05",
                   "mass_recall_at_15pct": "reported (a diagnostic: answers are the target)"}


def maskgen_table(result: dict) -> str:
    lines = [
        f"{result['device']}, torch {result['torch']}, Triton {result['triton']}, {result['date'][:10]}; "
        f"B=1 H=32 KVH=8 D=128 bf16 causal, block {result['config']['block_size']}. "
        f"Command: `{_portable(result['command'])}`.",
        "",
    ]
    # One column per estimator the file timed (older files: pooled and last_block), the default first.
    estimators = [e for e in ("adaptive", "pooled", "last_block") if f"dynamic_{e}_ms" in result["overhead"][0]]
    lines += [
        "| N | cuDNN SDPA ms | " + " | ".join(f"dynamic `{e}`, compiled ms (share of dense)" for e in estimators)
        + " | calibrated, cached ms | calibrated, first call ms |",
        "|---|---|" + "---|" * len(estimators) + "---|---|",
    ]
    for r in result["overhead"]:
        timed = " | ".join(f"{r[f'dynamic_{e}_ms']:.3f} ({r[f'dynamic_{e}_over_dense']:.1%})" for e in estimators)
        lines.append(f"| {r['seq_len'] // 1024}K | {r['cudnn_ms']:.3f} | {timed} | {r['calibrated_cached_ms']:.3f} "
                     f"| {r['calibrated_build_ms']:.1f} |")
    train = result["training"]
    if train is None:  # a run cut short after the overhead part
        lines += ["", "Attention-mass recall: not measured (the run ended before its training finished)."]
    else:
        lines += [
            "",
            f"Attention-mass recall on the Q/K of a small Llama trained in the run ({train['steps']} steps on "
            f"synthetic text, loss {train['loss_first']:.2f} -> {train['loss_last']:.2f}, from random "
            f"initialization: no pretrained model is available here), {train['train_len']} tokens, mean over "
            "layers and heads:",
            "",
            "| density cap | variant | measured density | mass recall |",
            "|---|---|---|---|",
        ]
    groups: dict = {}
    for r in result["fidelity"]:
        groups.setdefault((r["density_cap"], r["variant"]), []).append(r)
    for (cap, variant), rows in sorted(groups.items()):
        density = sum(r["density"] for r in rows) / len(rows)
        recall = sum(r["mass_recall"] for r in rows) / len(rows)
        lines.append(f"| {cap:.2f} | {variant} | {density:.3f} | {recall:.3f} |")
    lines += ["", "| headline (`summary`) | measured | target |", "|---|---|---|"]
    for field, target in MASKGEN_TARGETS.items():
        value = result["summary"].get(field)
        lines.append(f"| `{field}` | {'not measured' if value is None else value} | {target} |")
    return "\n".join(lines)


def _portable(command: str) -> str:
    # The run wrote to the device's scratch folder; the committed file is that output.
    return re.sub(r" --out \S+", "", command)


E2E_VARIANTS = ("eager", "inductor", "flex", "dam-dense", "dam-dynamic", "dam-calibrated")
E2E_TARGETS = {  # ../shared/RESULTS.md; a file from before a field existed has no row for it
    "prefill_speedup_32k": ">= 1.5 (vs the best dense baseline)",
    "prefill_speedup_128k": ">= 2.3 (vs the best dense baseline)",
    "prefill_speedup_vs_inductor_32k": "reported",
    "prefill_speedup_vs_inductor_128k": "reported",
    "prefill_ratio_4k": "<= 1.02",
    "decode_ratio_128k": ">= 1.0",
    "compile_time_ratio": "<= 1.3",
    "peak_mem_ratio_128k": "<= 1.0",
    "path_spread_32k": "<= 1.05",
    "path_spread_128k": "<= 1.05",
}


def e2e_paths_table(rows: list[dict]) -> list[str]:
    """The compile paths a user takes, each prefill against the fastest of them (same model and length)."""
    lines = ["", "| paths: model (layers) | N | path | prefill ms | / fastest | first call s | sites sparse / dense (graphs so far) | "
             "32-token answer ms |", "|---|---|---|---|---|---|---|---|"]
    best = {}
    for r in rows:
        if "ms" in r:
            key = (r["model"], r["length"])
            best[key] = min(best.get(key, r["ms"]), r["ms"])
    for r in sorted(rows, key=lambda r: (r["model"] != "llama-3.1-8b", r["model"], r["length"], PATHS.index(r["path"]))):
        head = f"| {r['model']} ({r['layers']}) | {r['length'] // 1024}K | {r['path']} |"
        if "error" in r:
            lines.append(f"{head} {r['error'][:90]} | | | | |")
            continue
        sites = f"{r['sites']['sparse']} / {r['sites']['dense']}"
        answer = f"{r['answer_ms']:.0f}" if "answer_ms" in r else ""
        lines.append(f"{head} {r['ms']:.1f} | {r['ms'] / best[(r['model'], r['length'])]:.3f} | "
                     f"{r['first_call_s']:.0f} | {sites} | {answer} |")
    return lines


def e2e_table(result: dict) -> str:
    lines = [
        f"{result['device']}, torch {result['torch']}, Triton {result['triton']}, transformers "
        f"{result['transformers']}, {result['date'][:10]}; {result['config']['weights']}, bf16, "
        f"`use_cache=False`, `logits_to_keep=1`, sequence dim marked dynamic"
        f"{' (in the paths table: as each path does)' if result.get('paths') else ''}; batch 4 is left-padded. Commands "
        f"(one session, in parts): `{_portable(result['command'])}`, then `--merge` of the parts.",
        "",
        "| model | batch | N | variant | prefill ms | inductor / this | peak GB | compile s | attention paths / error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    inductor = {(r["model"], r["batch"], r["length"]): r["ms"] for r in result["prefill"]
                if r["variant"] == "inductor" and "ms" in r}
    rows = sorted(result["prefill"], key=lambda r: (r["model"] != "llama-3.1-8b", r["model"], r["batch"], r["length"],
                                                     E2E_VARIANTS.index(r["variant"])))
    for r in rows:
        what = r.get("error", "").split("\n")[0][:90] or ", ".join(f"{k} x{v}" for k, v in r.get("paths", {}).items())
        base = inductor.get((r["model"], r["batch"], r["length"]))
        speedup = f"{base / r['ms']:.2f}x" if base and "ms" in r else "-"
        ms = f"{r['ms']:.1f}" if "ms" in r else "-"
        mem = f"{r['peak_mem_gb']:.1f}" if "peak_mem_gb" in r else "-"
        comp = f"{r['compile_s']:.0f}" if "compile_s" in r else ""
        lines.append(f"| {r['model']} | {r['batch']} | {r['length'] // 1024}K | {r['variant']} | {ms} | {speedup} | "
                     f"{mem} | {comp} | {what} |")
    if result["decode"]:
        lines += ["", "| decode: model | KV | variant | ms / token | tokens/s | peak GB | compile s |",
                  "|---|---|---|---|---|---|---|"]
        for r in sorted(result["decode"], key=lambda r: (r["model"], r["kv_len"], r["variant"])):
            if "error" in r:
                lines.append(f"| {r['model']} | {r['kv_len'] // 1024}K | {r['variant']} | {r['error'][:90]} | | | |")
                continue
            lines.append(f"| {r['model']} | {r['kv_len'] // 1024}K | {r['variant']} | {r['ms_per_token']:.2f} | "
                         f"{r['tokens_per_s']:.1f} | {r['peak_mem_gb']:.1f} | {r['compile_s']:.0f} |")
    if result.get("paths"):
        lines += e2e_paths_table(result["paths"])
    lines += ["", *headline_rows(result["summary"], E2E_TARGETS,
                                 lambda value, note: f"{value:.3f}" + (f" ({note})" if note else ""))]
    return "\n".join(lines)


TP_TARGETS = {  # ../shared/RESULTS.md, tp section
    "tp_max_rel_err_dense": "<= 2e-2",
    "tp_speedup_retention_128k": ">= 0.9",
    "tp_peak_mem_ratio_128k": "<= 1.0",
}


def tp_table(result: dict) -> str:
    cfg, single = result["config"], result["one_gpu"]
    lines = [
        f"{result['device']} x{cfg['tp']}, torch {result['torch']}, Triton {result['triton']}, transformers "
        f"{result['transformers']}, {result['date'][:10]}; {cfg['model']} shape, {cfg['weights']}, {cfg['dtype']}, "
        f"TP={cfg['tp']} ({cfg['sharding']}); `use_cache=False`, `logits_to_keep=1`, sequence dim marked dynamic. "
        f"Command, in `benchmarks/`: "
        f"`torchrun --nproc-per-node {cfg['tp']} {_portable(result['command']).removeprefix('python ')}`.",
        "",
        "| N | variant | prefill ms (TP) | fastest dense / this | peak GB (busiest rank) | first call s "
        "| attention paths |", "|---|---|---|---|---|---|---|",
    ]
    fastest = {}
    for r in result["prefill"]:
        if "ms" in r and not r["variant"].startswith("dam"):
            fastest[r["length"]] = min(fastest.get(r["length"], r["ms"]), r["ms"])
    for r in sorted(result["prefill"], key=lambda r: (r["length"], r["variant"])):
        if "ms" not in r:
            lines.append(f"| {r['length'] // 1024}K | {r['variant']} | {r.get('error', '')[:90]} | | | | |")
            continue
        paths = ", ".join(f"{k} x{v}" for k, v in r.get("paths", {}).items())
        ratio = f"{fastest[r['length']] / r['ms']:.2f}x" if r["length"] in fastest else "-"
        mem = f"{r['peak_mem_gb']:.1f}" if r.get("peak_mem_gb") else "-"
        lines.append(f"| {r['length'] // 1024}K | {r['variant']} | {r['ms']:.1f} | {ratio} | {mem} "
                     f"| {r['first_call_s']:.0f} | {paths} |")
    if single:
        lines += ["", f"One GPU, same run (rank 0, unsharded): eager {single['eager_ms']:.1f} ms, ours "
                      f"{single['dam-dynamic_ms']:.1f} ms at {single['length'] // 1024}K "
                      f"({single['eager_ms'] / single['dam-dynamic_ms']:.2f}x)."]
    if result["decode"]:
        lines += ["", "| decode: KV | variant | ms / token | tokens/s | peak GB (busiest rank) |",
                  "|---|---|---|---|---|"]
        for r in sorted(result["decode"], key=lambda r: (r["kv_len"], r["variant"])):
            lines.append(f"| {r['kv_len'] // 1024}K | {r['variant']} | {r['ms_per_token']:.2f} | "
                         f"{r['tokens_per_s']:.1f} | {r['peak_mem_gb']:.1f} |")
    else:
        lines += ["", "Decode: not measured in this run."]
    lines += ["", *headline_rows(result["summary"], TP_TARGETS, lambda value, note: f"{value:.3g} ({note})")]
    return "\n".join(lines)


FIDELITY_TARGETS = {  # ../shared/RESULTS.md
    "max_gap_to_full_default": "<= 1.0",
    "mean_density_default_16k": "<= 0.15",
    "mean_density_default_32k": "<= 0.10",
    "min_margin_over_streamingllm_default": "> 0",
    "max_gap_calibrated_hybrid": "<= 2.0",
    "scored_through_generate": "true",
    "max_gap_to_full_at_15pct": "reported (teacher-forced, dam-pooled@0.15: earlier versions' default)",
    "min_margin_over_streamingllm_at_15pct": "reported (teacher-forced, dam-pooled@0.15)",
    "mass_recall_at_15pct": "reported (diagnostic)",
}
FIDELITY_VARIANTS = ("full", "dam-default", "dam-pooled", "dam-last-block", "dam-calibrated-hybrid", "streaming",
                     "oracle", "random")


def _fidelity_label(row: dict) -> str:
    if row["matched"]:
        return f"{row['variant']}@matched"
    return row["variant"] if row["nominal_density"] is None or row["variant"] == "dam-default" else \
        f"{row['variant']}@{row['nominal_density']:g}"


def _fidelity_order(label: str) -> tuple:
    name, _, density = label.partition("@")
    return FIDELITY_VARIANTS.index(name) if name in FIDELITY_VARIANTS else len(FIDELITY_VARIANTS), \
        density != "matched", density


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 else str(n)


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _fidelity_header(result: dict) -> str:
    cfg, model = result["config"], result["config"]["model"]
    seeds = sorted(result["training"], key=int)
    trainings = []
    for seed in seeds:
        t = result["training"][seed]
        rounds = t.get("rounds", [])
        loss = f", answer loss {rounds[0]['loss_first']:.2f} -> {rounds[-1]['loss_last']:.2f}" if rounds else ""
        trainings.append(f"seed {seed}: {t['recipe']['steps']} steps + {t['rounds_done']} further rounds of "
                         f"{t['recipe']['extra_steps']}{loss}")
    check = result["quality_check"]
    verdict = "passed" if check["passed"] else "FAILED: " + result["summary"]["notes"].get("quality_check", "")
    return (
        f"{result['device']}, torch {result['torch']}, Triton {result['triton']}, transformers "
        f"{result['transformers']}, {result['date'][:10]}; a {model['num_hidden_layers']}-layer Llama (hidden "
        f"{model['hidden_size']}, {model['num_attention_heads']}/{model['num_key_value_heads']} heads) trained in the "
        f"run on lengths {result['training'][seeds[0]]['recipe']['lengths']} ({'; '.join(trainings)}). Quality check "
        f"(full attention through `generate()` on held-out check samples, >= 95% per task and length): {verdict}. "
        f"{cfg['samples_per_task']} held-out samples per task and length, depths 0-100%, scored through greedy "
        f"`generate()` (exact match), teacher-forced in parentheses; block {cfg['block_size']}; DAM variants compiled "
        f"with the `dam` backend (`min_seq_len=0`), baselines eager through our op. Commands: "
        f"`{_portable(result['command'])}`."
    )


def _fidelity_means(rows: list[dict], labels: list[str], lengths: list[int]) -> list[str]:
    """Accuracy, densities and speedup per variant and length (means over tasks)."""
    lines = ["| variant | " + " | ".join(f"{_tokens(n)} acc (tf) | {_tokens(n)} density prefill / decode | "
                                         f"{_tokens(n)} speedup" for n in lengths) + " |",
             "|---|" + "---|---|---|" * len(lengths)]
    for label in labels:
        cells = []
        for n in lengths:
            got = [r for r in rows if _fidelity_label(r) == label and r["length"] == n]
            acc, tf = _mean([r["accuracy"] for r in got]), _mean([r["accuracy_teacher_forced"] for r in got])
            density, decode = _mean([r["density"] for r in got]), _mean([r["density_decode"] for r in got])
            speedup = _mean([r.get("prefill_speedup") for r in got])
            cells.append(f"{_fmt(acc, '.1f')} ({_fmt(tf, '.1f')}) | {_fmt(density, '.3f')} / {_fmt(decode, '.3f')} | "
                         f"{_fmt(speedup, '.2f', 'x')}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _fidelity_per_task(rows: list[dict], labels: list[str], lengths: list[int]) -> list[str]:
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    lines = ["| variant | task | " + " | ".join(_tokens(n) for n in lengths) + " |",
             "|---|---|" + "---|" * len(lengths)]
    for label in labels:
        for task in tasks:
            cells = []
            for n in lengths:
                got = [r for r in rows if _fidelity_label(r) == label and r["length"] == n and r["task"] == task]
                acc, tf = _mean([r["accuracy"] for r in got]), _mean([r["accuracy_teacher_forced"] for r in got])
                cells.append(f"{_fmt(acc, '.0f')} ({_fmt(tf, '.0f')})")
            lines.append(f"| {label} | {task} | " + " | ".join(cells) + " |")
    return lines


def _fidelity_by_variant(summary: dict) -> list[str]:
    fields = ("max_gap_to_full", "max_gap_to_full_teacher_forced", "min_margin_over_streamingllm", "mean_density",
              "mean_density_decode", "mean_prefill_speedup")
    lines = ["| variant (`summary.by_variant`) | max gap to full | max gap, teacher-forced | min margin over "
             "StreamingLLM | mean density | mean decode density | mean prefill speedup |",
             "|---|---|---|---|---|---|---|"]
    for label, got in sorted(summary["by_variant"].items(), key=lambda v: _fidelity_order(v[0])):
        cells = [_fmt(got[f], ".3f" if "density" in f else ".2f" if "speedup" in f else ".1f") for f in fields]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def fidelity_table(result: dict) -> str:
    """Per training seed (variants are compared within one stand-in: not every variant ran on every seed), the
    means and the per-task table; then the headline and the per-variant summary over seeds."""
    per_seed = []
    for seed in sorted({r["seed"] for r in result["rows"]}):
        rows = [r for r in result["rows"] if r["seed"] == seed]
        lengths = sorted({r["length"] for r in rows})
        labels = sorted({_fidelity_label(r) for r in rows}, key=_fidelity_order)
        per_seed += [
            f"**Seed {seed}.** Accuracy through `generate()` (%, mean over tasks; teacher-forced in parentheses), "
            "measured block density of the plans our op ran (prefill / decode) and prefill speedup over the best "
            "dense path:", "",
            *_fidelity_means(rows, labels, lengths), "",
            f"Seed {seed} per task (accuracy %; teacher-forced in parentheses):", "",
            *_fidelity_per_task(rows, labels, lengths), "",
        ]
    return "\n".join([
        _fidelity_header(result), "", *per_seed,
        *headline_rows(result["summary"], FIDELITY_TARGETS,
                       lambda value, note: str(value).lower() if isinstance(value, bool) else f"{value:.3f}"), "",
        *_fidelity_by_variant(result["summary"]),
        *(["", "Failed in the run: " + result["summary"]["notes"]["errors"]] if result.get("errors") else []),
    ])


def scored_through_generate(result: dict) -> bool:
    """Fidelity files from before generate() scoring have another layout; they are not rendered."""
    return bool(result.get("summary", {}).get("scored_through_generate"))


REAL_TARGETS = {  # ../shared/RESULTS.md, section real; issue 39: KL and top-1 gap to the bf16 floor lead
    **{f"real_{field}_{tag}": target for tag in ("4k", "8k", "16k", "32k") for field, target in (
        ("kl", "reported"), ("top1_gap", "<= 0.01"), ("generate_agree_vs_floor", "reported (1.0: the floor's own)"),
        ("density", "reported"))},
    "real_ppl_ratio_8k": "<= 1.01",
    "real_ppl_ratio_32k": "<= 1.02 (native lengths only)",
    "real_min_margin_over_streaming": "> 0",
    "real_min_kl_margin_over_streaming": "> 0",
    "real_prefill_speedup_8k": ">= 1.0 (issue 38)",
    "real_prefill_speedup_16k": "reported",
    "real_prefill_speedup_32k": ">= 1.3",
    "real_generate_speedup_8k": "reported",
    "real_generate_speedup_16k": "reported",
    "real_generate_speedup_32k": "> 1.0 (issue 38)",
    "real_prefill_speedup_masked_8k": ">= 1.0 (with attention_mask, as generate() calls it)",
    "real_prefill_speedup_masked_32k": ">= real_prefill_speedup_32k - 3%",
    "real_token_ms_ratio_8k": "<= 1.0 (ours / Inductor per generated token)",
    "real_token_ms_ratio_32k": "<= 1.0",
    "real_token_ms_ratio_ro_8k": "<= 1.0 (both with mode='reduce-overhead')",
    "real_generate256_speedup_8k": ">= 1.0",
    "real_generate256_speedup_32k": ">= 1.3",
    "real_attention_speedup_32k": ">= 2.0 (issue 38)",
    "real_attention_with_plan_speedup_32k": "reported",
    "real_attention_vs_flex_32k": "reported",
    "real_hf_route_prefill_ratio_32k": "<= 1.05 (attn_implementation='dam' / backend='dam')",
    "real_retrieval_max_gap": "<= 1.0",
    "real_retrieval_min_full": ">= 95 (full attention first)",
    "real_calibrated_ppl_ratio_8k": "<= 1.03",
    "real_calibrated_best_kl_8k": "reported (beside real_kl_8k)",
    "real_calibrated_best_density_8k": "reported",
}


def _dense_layers(count: int) -> str:
    return {0: "no layer runs dense", 1: "layer 0 runs dense"}.get(count, f"layers 0-{count - 1} run dense")


def real_table(result: dict) -> str:
    """The real-model bench: per length and variant, pooled over the documents; the default's per-layer mass
    recall and density; the headline."""
    import bench_real  # the pooling the summary uses

    rows = result["rows"]
    if not rows:  # a speed-only run (bench_real.py --lengths '')
        return "\n".join([f"{result['device']}, torch {result['torch']}, transformers {result['transformers']}, "
                          f"{result['date'][:10]}; {result['model']}. Command: `{_portable(result['command'])}`.",
                          *real_speed_table(result.get("speed", [])), "",
                          *headline_rows(result["summary"], REAL_TARGETS, lambda value, note: f"{value:.5g}")])
    lengths = sorted({r["length"] for r in rows})
    docs = list(dict.fromkeys(r["doc"] for r in rows))
    docs_at = {n: list(dict.fromkeys(r["doc"] for r in rows if r["length"] == n)) for n in lengths}
    if any(d != docs for d in docs_at.values()):  # parts run apart (bench_real.py --merge)
        docs_text = "; ".join(f"{_tokens(n)}: {', '.join(d)}" for n, d in docs_at.items())
    else:
        docs_text = ", ".join(docs)
    rope = "; ".join(f"{_tokens(int(n))}: {v['rope_parameters'].get('rope_type', 'default')}"
                     + (f" x{v['rope_parameters']['factor']:g}" if "factor" in v["rope_parameters"] else "")
                     for n, v in sorted(result["rope"].items(), key=lambda kv: int(kv[0])))
    lines = [
        f"{result['device']}, torch {result['torch']}, transformers {result['transformers']}, {result['date'][:10]}; "
        f"{result['model']}; documents {docs_text} (their sources and sha256 in the file's `texts`); "
        f"RoPE {rope}; every position of each prompt's second half scored, "
        f"{next((r['positions'] for r in rows if r['length'] == lengths[0]), 0)} "
        f"at the shortest length. Command: `{_portable(result['command'])}`.",
        "",
        f"| length | variant | KL(full, variant) nats | top-1 = full's | top-1 gap to the bf16 floor | prefill density "
        f"| generate() tokens equal to full's (of {result.get('new_tokens', '-')}) | perplexity / full's (native "
        f"lengths only) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    native = bench_real.native_lengths(result.get("rope", {}))
    for n in lengths:
        floor = bench_real.pooled(rows, "dense-op", n)
        for variant in dict.fromkeys(r["variant"] for r in rows):
            got = bench_real.pooled(rows, variant, n)
            if got is not None:
                gap = f"{floor['top1'] - got['top1']:+.3f}" if floor else "-"
                ppl = f"{got['ppl_ratio']:.4f}" if n in native else "-"
                lines.append(f"| {_tokens(n)} | {variant} | {got['kl']:.4f} | {got['top1']:.3f} | {gap} "
                             f"| {got['density']:.3f} | {got['generate_agree']:.1f} | {ppl} |")
    lines += real_retrieval_table(result.get("retrieval"))
    layers = [r for r in result.get("layers", []) if r.get("variant", "dam-default") == "dam-default"]
    if layers:
        dense = _dense_layers(result["defaults"]["dense_layers"])
        lines += ["", "The default's plans per layer (first document): block density and the exact attention mass they "
                      f"keep, averaged over heads and every query row ({dense}):",
                  "",
                  "| layer | " + " | ".join(f"{_tokens(n)} density | {_tokens(n)} mass kept" for n in lengths) + " |",
                  "|---|" + "---|---|" * len(lengths)]
        by = {(r["module"], r["length"]): r for r in layers if r["doc"] == docs_at[r["length"]][0]}
        for module in dict.fromkeys(r["module"] for r in layers):
            cells = []
            for n in lengths:
                r = by.get((module, n))
                cells += ["-", "-"] if r is None else [f"{r['density']:.3f}", f"{r['recall']:.4f}"]
            lines.append(f"| {module.split('.')[-2]} | " + " | ".join(cells) + " |")
    lines += real_speed_table(result.get("speed", []))
    lines += ["", *headline_rows(result["summary"], REAL_TARGETS, lambda value, note: f"{value:.5g}")]
    return "\n".join(lines)


def _paths(counts: dict | None) -> str:
    """Our attention calls of one timed prefill, by the path they took (``dam_compile.runtime_stats``)."""
    if not counts:
        return "-"
    parts = []
    for key, n in counts.items():
        path, reason = key.split(": ", 1)
        why = "measured crossover" if "crossover" in reason else "dense layers" if "dense_layers" in reason else reason
        parts.append(f"{n} sparse" if path == "triton" else f"{n} dense ({why})")
    return ", ".join(parts)


def real_retrieval_table(retrieval: dict | None) -> list[str]:
    """Retrieval through generate() after the run's fine-tune (``benchmarks/real_retrieval.py``)."""
    if not retrieval:
        return []
    training = retrieval["training"]
    first, last = training["checks"][0], training["checks"][-1]
    shipped = ", ".join(f"{k} {v:.2f}" for k, v in first.items() if "@" in k)
    lines = ["", f"Retrieval through `generate()` (`real_retrieval.py`): full attention's teacher-forced check as the "
                 f"model ships: {shipped}; after {training['steps']} fine-tune steps ({training['seconds']:.0f} s): "
                 + ", ".join(f"{k} {v:.2f}" for k, v in last.items() if "@" in k)
                 + f" (target reached: {training['reached']}). Held-out prompts, accuracy % (95% interval):", "",
             "| task | length | variant | accuracy | correct | density |", "|---|---|---|---|---|---|"]
    for r in retrieval["rows"]:
        low, high = r["interval95"]
        lines.append(f"| {r['task']} | {_tokens(r['length'])} | {r['variant']} | {r['accuracy']:.1f} "
                     f"({low:.0f}-{high:.0f}) | {r['correct']}/{r['samples']} | {r.get('density', 1.0):.3f} |")
    return lines


def real_speed_table(speed: list[dict]) -> list[str]:
    """The real model's compiled prefill (with and without ``attention_mask``), time per generated token and
    whole ``generate()`` against eager and Inductor, and attention alone on its own Q/K/V
    (``benchmarks/real_speed.py``). Files from before issue 43 timed prefill without the mask only."""
    if not speed:
        return []
    rope = speed[0].get("rope", {}).get("rope_parameters", {})
    lines = ["", f"Prefill (median ms, bf16, batch 1; every length on the model with "
                 f"{rope.get('rope_type', 'default')} RoPE x{rope.get('factor', 1):g}; `logits_to_keep=1`). "
                 "With `attention_mask=ones` is how `generate()` and most user code call the model:",
             "",
             "| length | eager, with mask | Inductor, with mask | ours, with mask | vs best dense | eager, no mask | "
             "Inductor, no mask | ours, no mask | vs best dense | our attention calls (2 warm-up and the timed "
             "prefills with the mask) |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def cell(r: dict, key: str) -> str:
        return _ms(r.get(key)) if key in r else ("OOM" if key.replace("_ms", "_error") in r else "-")

    def ratio(r: dict, key: str) -> str:
        return f"{r[key]:.2f}x" if key in r else "-"

    for r in speed:
        paths = r.get("dam_default_paths", r.get("dam_paths"))
        lines.append(f"| {_tokens(r['length'])} | {cell(r, 'masked_eager_ms')} | {cell(r, 'masked_inductor_ms')} | "
                     f"{cell(r, 'masked_dam_default_ms')} | {ratio(r, 'masked_speedup')} | {cell(r, 'eager_ms')} | "
                     f"{cell(r, 'inductor_ms')} | {cell(r, 'dam_default_ms')} | {ratio(r, 'speedup')} | "
                     f"{_paths(paths)} |")
    if any("generate_dam_default_ms" in r for r in speed):
        lines += ["", "Whole `generate()` (greedy, the default cache, `attention_mask=ones`; ms) and the time of one "
                      "generated token ((generate of 32 - generate of 1) / 31); `-ro`: `mode=\"reduce-overhead\"`:",
                  "", "| length | per token: eager | Inductor | ours | ours / Inductor | Inductor-ro | ours-ro | "
                      "ours-ro / Inductor-ro | 32 tokens: eager | Inductor | ours | vs best dense | 256 tokens: eager "
                      "| Inductor | ours | vs best dense |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in speed:
            if "generate_dam_default_ms" not in r:
                continue
            lines.append(
                f"| {_tokens(r['length'])} | {cell(r, 'token_eager_ms')} | {cell(r, 'token_inductor_ms')} | "
                f"{cell(r, 'token_dam_default_ms')} | {ratio(r, 'token_ratio')} | {cell(r, 'token_inductor_ro_ms')} | "
                f"{cell(r, 'token_dam_ro_ms')} | {ratio(r, 'token_ratio_ro')} | {cell(r, 'generate_eager_ms')} | "
                f"{cell(r, 'generate_inductor_ms')} | {cell(r, 'generate_dam_default_ms')} | "
                f"{ratio(r, 'generate_speedup')} | {cell(r, 'generate256_eager_ms')} | "
                f"{cell(r, 'generate256_inductor_ms')} | {cell(r, 'generate256_dam_default_ms')} | "
                f"{ratio(r, 'generate256_speedup')} |")
    for r in speed:
        a = r.get("attention")
        if a:
            lines += ["", f"Attention alone at {_tokens(a['length'])} on the model's own Q/K/V, summed over its "
                          f"{a['layers']} sparse layers (the default plan's mean density {a['density']:.3f}): dense "
                          f"cuDNN SDPA {a['dense_ms']:.2f} ms; our plan {a['plan_ms']:.2f} ms "
                          f"({a['plan_share_of_dense']:.1%} of dense); our kernel {a['ours_ms']:.2f} ms "
                          f"({a['speedup_kernel']:.2f}x cuDNN, {a['speedup_with_plan']:.2f}x with the plan); "
                          f"FlexAttention on the identical plans {a['flex_ms']:.2f} ms ({a['vs_flex']:.2f}x ours)."]
    return lines


PLAN_SHAPES = {"smollm2": "SmolLM2-135M (H=9 KVH=3 D=64)", "llama-8b": "Llama-3.1-8B (H=32 KVH=8 D=128)"}


def plan_table(result: dict) -> str:
    """The default plan's cost by stage, old and new path, and the measured crossover (``bench_plan.py``)."""
    lines = [f"{result['device']}, torch {result['torch']}, Triton {result['triton']}, {result['date'][:10]}; "
             f"B=1, bf16, causal, block 128, default options. Command: `{_portable(result['command'])}`.", ""]
    if result.get("stages"):
        lines += ["| shape | N | dense cuDNN ms | plan ms (share of dense) | its kernels: GPU us, launches | host us "
                  "per plan | compiled definition (before): GPU us, launches, host us, synchronised ms | ours at "
                  "0.3 / 0.5 ms |", "|---|---|---|---|---|---|---|---|"]
        for r in result["stages"]:
            f, old = r["fused"], r.get("compiled_definition")
            before = (f"{old['gpu_us']:.0f}, {old['launches']:.0f}, {old['host_us']:.0f}, {old['wall_ms']:.2f}"
                      if old else "-")
            lines.append(f"| {PLAN_SHAPES[r['shape']]} | {_tokens(r['seq_len'])} | {r['dense_ms']:.3f} | "
                         f"{f['plan_ms']:.3f} ({r['fused_share_of_dense']:.1%}) | {f['gpu_us']:.0f}, "
                         f"{f['launches']:.0f} | {f['host_us']:.0f} | {before} | "
                         f"{r['sparse_ms_0.3']:.3f} / {r['sparse_ms_0.5']:.3f} |")
        lines += ["", "Per kernel of the plan (GPU us per call):", ""]
        for r in result["stages"]:
            kernels = ", ".join(f"`{name.split('(')[0]}` {us:.0f}" for name, us in r["fused"]["kernel_us"].items())
            lines.append(f"- {PLAN_SHAPES[r['shape']]}, {_tokens(r['seq_len'])}: {kernels}")
    if result.get("crossover"):
        lines += ["", "Crossover: dense SDPA against our plan + our kernel on a plan of the given density:", "",
                  "| shape | N | work (N x N x H x D) | dense ms | plan + sparse at 0.3 | at 0.5 |",
                  "|---|---|---|---|---|---|"]
        for r in result["crossover"]:
            lines.append(f"| {PLAN_SHAPES[r['shape']]} | {_tokens(r['seq_len'])} | {r['work']:.2e} | "
                         f"{r['dense_ms']:.3f} "
                         f"| {r['plan_and_sparse_ms_0.3']:.3f} ({r['speedup_0.3']:.2f}x) "
                         f"| {r['plan_and_sparse_ms_0.5']:.3f} ({r['speedup_0.5']:.2f}x) |")
    if result.get("decode"):
        lines += ["", "One decode step: dense SDPA against the dynamic decode plan + our decode kernel:", "",
                  "| shape | KV | K/V MiB | dense us | plan + sparse us | host us (sparse) | launches |",
                  "|---|---|---|---|---|---|---|"]
        for r in result["decode"]:
            lines.append(f"| {PLAN_SHAPES[r['shape']]} | {_tokens(r['kv_len'])} | {r['kv_bytes'] / 2**20:.0f} | "
                         f"{r['dense_us']:.1f} | {r['sparse_us']:.1f} | {r['sparse_host_us']:.0f} | "
                         f"{r['sparse_kernels']['launches']:.0f} |")
    lines += ["", *headline_rows(result["summary"], PLAN_TARGETS, lambda value, note: f"{value:.4g}")]
    return "\n".join(lines)


PLAN_TARGETS = {"overhead_vs_dense_32k": "<= 0.10 (issue 38)", "overhead_vs_dense_128k": "<= 0.05 (issue 38)",
                "crossover_work_at_density_0.3": "reported", "crossover_work_at_density_0.5": "reported"}


TABLES = {
    "real": ("real_*.json", real_table),
    "plan": ("plan_*.json", plan_table),
    "kernel": ("kernel_*.json", kernel_table),
    "maskgen": ("maskgen_*.json", maskgen_table),
    "e2e": ("e2e_h*.json", e2e_table),
    "fidelity": ("fidelity_h*.json", fidelity_table),
    "tp": ("tp_h*.json", tp_table),
}
RENDERABLE = {"fidelity": scored_through_generate}  # files of a layout the table functions read

# The project README's headline: (results file, summary field, what it measures). Each row reads the file's
# ``summary``; its target is the one the full table in benchmarks/README.md shows.
HEADLINE = [
    ("kernel_h200.json", "dense_vs_cudnn_128k", "kernel, every block kept, 128K: cuDNN SDPA time / ours"),
    ("kernel_h200.json", "sparse_vs_cudnn_128k",
     "kernel at 30% / 10% / 3% density, 128K: worst of time / (density x cuDNN dense time)"),
    ("kernel_h200.json", "vs_flex_min", "kernel vs FlexAttention on the same plan, 32K and 128K: least speedup"),
    ("plan_h100.json", "overhead_vs_dense_32k", "the default plan's cost / dense cuDNN attention, 8B shape, 32K"),
    ("real_h100.json", "real_prefill_speedup_32k", "SmolLM2-135M compiled prefill, 32K: best dense path / ours"),
    ("real_h100.json", "real_attention_speedup_32k", "SmolLM2-135M attention alone on its plans, 32K: cuDNN / ours"),
    ("real_h100.json", "real_generate_speedup_8k", "SmolLM2-135M `generate()` of 32 tokens, 8K: best dense / ours"),
    ("real_h100.json", "real_generate_speedup_32k", "SmolLM2-135M `generate()` of 32 tokens, 32K: best dense / ours"),
    ("real_h100.json", "real_kl_8k", "SmolLM2-135M at 8K: KL(full, default) per token, nats"),
    ("real_h100.json", "real_top1_gap_8k",
     "SmolLM2-135M at 8K: top-1 agreement with full attention, gap under the bf16 floor's"),
    ("real_qwen_h100.json", "real_kl_32k", "Qwen2.5-Coder-0.5B at 32K: KL(full, default) per token, nats"),
    ("real_qwen_h100.json", "real_ppl_ratio_32k", "Qwen2.5-Coder-0.5B at 32K: perplexity / full attention's"),
    ("real_h100.json", "real_retrieval_max_gap", "SmolLM2-135M fine-tuned in the run, passkey and key-value "
                                                 "retrieval through `generate()` at 4K and 8K: largest accuracy "
                                                 "gap to full attention, points"),
]
HEADLINE_TARGETS = {**KERNEL_TARGETS, **PLAN_TARGETS, **REAL_TARGETS}


def headline_table(results: Path = RESULTS) -> str:
    """A few numbers that say where the project stands, each from its results file's ``summary`` (rows whose
    file is not there are left out)."""
    lines = ["| measure | value | target | run |", "|---|---|---|---|"]
    for name, field, what in HEADLINE:
        path = results / name
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        value = result["summary"].get(field)
        note = result["summary"].get("notes", {}).get(field, "")
        shown = ("not measured" if value is None else f"{value:.3g}") + (f" ({note})" if note else "")
        device = result["device"].replace("NVIDIA ", "").replace(" 80GB HBM3", "")
        lines.append(f"| {what} | {shown} | {HEADLINE_TARGETS.get(field, 'reported')} "
                     f"| [{device}, {result['date'][:10]}](benchmarks/results/{name}) |")
    return "\n".join(lines)


ROOT_README = ROOT / "README.md"
BENCH_README = ROOT / "benchmarks" / "README.md"


def _bench_sections() -> dict[str, str]:
    """The full tables of benchmarks/README.md, by marker name (a name with no renderable file is left out:
    its section stays as it is)."""
    sections = {}
    for name, (pattern, make) in TABLES.items():
        results = [json.loads(p.read_text()) for p in sorted(RESULTS.glob(pattern)) if "quick" not in p.name]
        results = [r for r in results if RENDERABLE.get(name, bool)(r)]
        if results:
            sections[name] = "\n\n".join(make(r) for r in results)
    return sections


FILES: dict[Path, Callable[[], dict[str, str]]] = {  # each file and its marked sections
    ROOT_README: lambda: {"headline": headline_table()},
    BENCH_README: _bench_sections,
}


def render(text: str, sections: dict[str, str], where: str = "README.md") -> str:
    """``text`` with each marked section replaced by its body."""
    for name, body in sections.items():
        start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
        if start not in text or end not in text:
            raise SystemExit(f"{where} lacks the {start} ... {end} markers")
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = f"{before}{start}\n{body}\n{end}{after}"
    return text


def updates(files: dict[Path, Callable[[], dict[str, str]]] | None = None) -> dict[Path, tuple[str, str]]:
    """Per file, its current text and the text with every marked section regenerated."""
    out = {}
    for path, sections in (files or FILES).items():
        current = path.read_text()
        out[path] = (current, render(current, sections(), _shown(path)))
    return out


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if a marked section is not up to date")
    args = parser.parse_args(argv)
    changed = {path: updated for path, (current, updated) in updates().items() if updated != current}
    if args.check:
        if changed:
            names = ", ".join(_shown(p) for p in changed)
            print(f"benchmark tables out of date in {names}: run python benchmarks/readme_tables.py")
            sys.exit(1)
        return
    for path, updated in changed.items():
        path.write_text(updated)


if __name__ == "__main__":
    main()
