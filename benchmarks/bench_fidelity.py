"""Fidelity: does DAM keep the answers? Retrieval accuracy against block density, for full attention, DAM
(dynamic and calibrated), StreamingLLM, the oracle (top blocks by exact mass) and random blocks.

Pretrained long-context weights cannot be downloaded here, so the run trains its own stand-in: a Llama-shaped
``LlamaForCausalLM`` (6 layers, hidden 512, 8 query / 2 KV heads, RoPE) on the synthetic tasks of
``fidelity_tasks.py`` (passkey, multi-key needles, LongEval-style line retrieval, variable tracking) at lengths up
to the evaluation lengths, then evaluates held-out samples. The weights are cached (``--cache-dir``) so a
second run skips training. Every sparse variant runs through ``dam_compile.sparse_attention`` (our op and, on
CUDA, our Triton kernel) with the plan of that variant; densities are measured on the plans, not nominal.

    python benchmarks/bench_fidelity.py                 # train (cached) and evaluate, H100
    python benchmarks/bench_fidelity.py --quick         # one length, fewer samples
    python benchmarks/bench_fidelity.py --smoke --out /tmp/f.json   # CPU pipeline check: tiny model, no claims
    python benchmarks/bench_fidelity.py --merge part1.json part2.json   # one results file, summary and plot

Accuracy is exact match of the answer tokens (teacher-forced: every answer token is the argmax given the
right prefix, which is what greedy decoding produces when it is right).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from pathlib import Path
from statistics import mean

import torch
from tqdm import tqdm

import fidelity_tasks as ft
from bench_common import RESULTS, merged_header, run_metadata, write_result

import dam_compile
from dam_compile.config import DAMConfig
from dam_compile.kernels import BlockSparsePlan, plan_density
from dam_compile.kernels.structured_plans import causal_block_tables, density_matched_streaming_plan, random_plan
from dam_compile.metrics import attention_mass_recall, top_mass_plan
from dam_compile.module_stack import AttentionCallMode
from dam_compile.reference_mode import plan_for

DENSITIES = (0.05, 0.10, 0.15, 0.30)
MATCHED = ("dam-dynamic", "dam-dynamic-last-block", "streaming", "oracle", "random")  # run at each density
HEADLINE_DENSITY = 0.15


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="4096,8192,16384", help="evaluation prompt lengths")
    p.add_argument("--train-lengths", default="256,512,1024,2048,4096,8192,16384",
                   help="curriculum, shortest first; each entry gets an equal share of the steps (repeat one to give "
                        "it more)")
    p.add_argument("--train-steps", type=int, default=2400)
    p.add_argument("--train-tokens", type=int, default=65536, help="tokens per training step")
    p.add_argument("--train-questions", type=int, default=16,
                   help="questions asked (and answered) after each training context: more answers per sequence")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW, warmup then cosine)")
    p.add_argument("--samples", type=int, default=12, help="samples per (task, length), depths 0..1")
    p.add_argument("--densities", default=",".join(map(str, DENSITIES)))
    p.add_argument("--variants", default=",".join(("full", *MATCHED, "dam-calibrated")),
                   help="which to evaluate: full, " + ", ".join(MATCHED) + ", dam-calibrated (one per PCL)")
    p.add_argument("--pcls", default="128,512", help="calibration lengths of the calibrated profiles")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "dam_compile" / "fidelity")
    p.add_argument("--quick", action="store_true", help="8K only, 4 samples per task")
    p.add_argument("--smoke", action="store_true", help="CPU pipeline check: tiny model, 256 tokens, no claims")
    p.add_argument("--merge", nargs="+", type=Path, metavar="PART",
                   help="merge part files (say, one per length, from one trained model) into one results file")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    unknown = set(args.variants.split(",")) - {"full", *MATCHED, "dam-calibrated"}
    if unknown:
        p.error(f"--variants: unknown {', '.join(sorted(unknown))}")
    if args.quick:
        args.lengths, args.samples = "8192", 4
    if args.smoke:
        args.lengths, args.train_lengths, args.train_steps, args.train_tokens = "256", "256", 20, 1024
        args.samples, args.densities, args.pcls, args.block_size = 2, "0.3", "64", 16
    return args


def model_config(smoke: bool):
    import transformers

    size = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
            if smoke else dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8))
    return transformers.LlamaConfig(
        vocab_size=ft.VOCAB, num_key_value_heads=2, max_position_embeddings=65536, rope_theta=500000.0,
        attn_implementation="sdpa", **size)


def trained_model(args, device: str, log) -> tuple[torch.nn.Module, dict]:
    """The stand-in model: loaded from the cache when this config was trained before, else trained and cached."""
    import transformers
    from safetensors.torch import load_file, save_file

    config = model_config(args.smoke)
    recipe = dict(config=config.to_dict(), steps=args.train_steps, tokens=args.train_tokens, lr=args.lr,
                  questions=args.train_questions,
                  lengths=args.train_lengths, seed=args.seed)
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = args.cache_dir / f"fidelity_{key}.safetensors"
    torch.manual_seed(args.seed)
    model = transformers.LlamaForCausalLM(config).to(device)
    # Evaluated (and cached) in bf16 on CUDA, so a loaded model is the one that was trained, bit for bit.
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if path.is_file():
        model.to(dtype).load_state_dict(load_file(str(path), device=device))
        log(f"loaded trained weights from {path}")
        return model.eval(), {"recipe": recipe, "cached": str(path), "loaded": True}
    info = train(model, args, device)
    model.to(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    log(f"trained {args.train_steps} steps in {info['seconds']:.0f} s: loss {info['loss_first']:.3f} -> "
        f"{info['loss_last']:.3f}; cached at {path}")
    return model.eval(), {"recipe": recipe, "cached": str(path), "loaded": False, **info}


class TrainingSteps(torch.utils.data.Dataset):
    """Step ``i``'s batch ``(ids, labels)``: the curriculum spends equal steps on each listed length, shortest
    first, ``tokens // length`` rows a step; deterministic in the seed, so loader workers can build them."""

    def __init__(self, args):
        self.lengths = [int(n) for n in args.train_lengths.split(",")]
        self.steps, self.tokens, self.seed, self.questions = (args.train_steps, args.train_tokens, args.seed,
                                                              args.train_questions)

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int):
        length = self.lengths[min(len(self.lengths) - 1, step * len(self.lengths) // self.steps)]
        return ft.training_batch(max(1, self.tokens // length), length, seed=self.seed * 10**6 + step,
                                 questions=self.questions)


def train(model, args, device: str) -> dict:
    """AdamW with warmup and cosine decay over the curriculum of :class:`TrainingSteps`; the loss is on answer
    tokens only. Batches are built by loader workers (Python-made; the GPU would wait for them otherwise)."""
    steps = TrainingSteps(args)
    workers = min(8, (os.cpu_count() or 1) - 1) if device == "cuda" else 0
    loader = torch.utils.data.DataLoader(steps, batch_size=None, num_workers=workers,
                                         prefetch_factor=4 if workers else None)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, args.train_steps // 20)
    losses, start = [], time.perf_counter()
    model.train()
    bar = tqdm(loader, desc="train", mininterval=10)
    for step, (ids, labels) in enumerate(bar):
        length = ids.shape[1]
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=ids.to(device), labels=labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.train_steps))
        for group in opt.param_groups:
            group["lr"] = args.lr * max(scale, 0.05)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 49:
            bar.set_postfix(length=length, loss=f"{mean(losses[-50:]):.3f}")
    tail = losses[-max(1, len(losses) // 10):]
    every = max(1, len(losses) // 50)  # the curve in 50 points, each the mean loss of its steps
    return {"seconds": time.perf_counter() - start, "loss_first": losses[0], "loss_last": mean(tail),
            "loss_curve": [mean(losses[i:i + every]) for i in range(0, len(losses), every)]}


class VariantAttention(AttentionCallMode):
    """Runs every causal self-attention call of the model through ``dam_compile.sparse_attention`` with the
    variant's plan; records each plan's measured density and, when asked, its attention-mass recall."""

    def __init__(self, model, variant: str, density: float, block: int, profile=None, recall: bool = False,
                 seed: int = 0):
        super().__init__(model)
        self.variant, self.density, self.block, self.profile = variant, density, block, profile
        # DAM variants use the plan ops the pass inserts, as users run them.
        # "dam-dynamic" is the default configuration; "-last-block" estimates from the last query block's
        # exact attention (MInference-style) instead of pooled blocks.
        self.config = DAMConfig(block_size=block, min_seq_len=0, kernel="reference", density=density, profile=profile,
                                mask_source="calibrated" if profile is not None else "dynamic",
                                estimator="last_block" if variant.endswith("-last-block") else "pooled")
        self.want_recall, self.densities, self.recalls = recall, [], []
        self.seed, self.generator = seed, None
        self.kernel = "reference" if not torch.cuda.is_available() else "auto"

    def on_attention(self, name, a):
        q, k, v = a["query"], a["key"], a["value"]
        if a["attn_mask"] is not None or not a["is_causal"] or q.shape[-2] != k.shape[-2]:
            raise ValueError(f"{name}: expected unpadded causal self-attention (is_causal=True, no mask)")
        plan = self.plan(name, q, k)
        n = q.shape[-2]
        self.densities.append(plan_density(plan, n, n, True))
        gqa = k.shape[1] != q.shape[1]
        if self.want_recall:
            self.recalls.append(attention_mass_recall(q, k, plan, is_causal=True, enable_gqa=gqa).mean(0).tolist())
        return dam_compile.sparse_attention(q, k, v, plan, scale=a["scale"], is_causal=True, enable_gqa=gqa,
                                            kernel=self.kernel)

    def plan(self, name: str, q, k) -> BlockSparsePlan:
        n, block, d = q.shape[-2], self.block, self.density
        if self.variant.startswith("dam-"):
            patterns = self.profile.patterns_on(self.profile.find_module(name), q.device) if self.profile else None
            return plan_for(self.config, q, k, True, patterns=patterns)
        if self.variant == "streaming":
            return density_matched_streaming_plan(n, block, d, q.device)
        if self.variant == "oracle":
            visible, _ = causal_block_tables(n, n, block, True, q.device)
            budget = (visible.sum(-1) * d).round().clamp(min=1).to(torch.int64)
            return top_mass_plan(q, k, block, budget.expand(q.shape[0], q.shape[1], -1))
        if self.variant == "random":
            if self.generator is None:
                self.generator = torch.Generator(device=q.device).manual_seed(self.seed)
            return random_plan(n, n, block, d, q.shape[1], device=q.device, generator=self.generator)
        raise ValueError(f"unknown variant {self.variant!r}")


def held_out(tasks, length: int, samples: int, seed: int) -> list[ft.Sample]:
    """``samples`` per task at depths evenly spread over [0, 1]; seeds disjoint from training's."""
    depths = [i / max(1, samples - 1) for i in range(samples)]
    return [ft.make_sample(task, length, depth, seed=10**9 + seed * 10**6 + length * 100 + i)
            for task in tasks for i, depth in enumerate(depths)]


@torch.no_grad()
def correct(model, sample: ft.Sample, device: str) -> bool:
    """Every answer token is the argmax after the right prefix (= greedy decoding gets the answer)."""
    ids = torch.cat([sample.prompt, sample.answer[:-1]])[None].to(device)
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=len(sample.answer)).logits
    return bool(torch.equal(logits[0].argmax(-1).cpu(), sample.answer))


def evaluate(model, args, profiles: dict, device: str) -> list[dict]:
    """One row per (variant, density, length, task): accuracy, measured density, mass recall (first sample)."""
    densities = [float(d) for d in args.densities.split(",")]
    wanted = args.variants.split(",")
    cases = ([("full", None)] * ("full" in wanted) + [(v, d) for v in MATCHED if v in wanted for d in densities]
             + [(v, None) for v in profiles])
    rows = []
    lengths = [int(n) for n in args.lengths.split(",")]
    bar = tqdm(total=len(cases) * len(lengths) * len(ft.TASKS) * args.samples, desc="evaluate", unit="sample")
    for length in lengths:
        samples = held_out(ft.TASKS, length, args.samples, args.seed)
        for variant, density in cases:
            for task in ft.TASKS:
                hits, measured, recalls = [], [], []
                for i, sample in enumerate(s for s in samples if s.task == task):
                    if variant == "full":
                        hits.append(correct(model, sample, device))
                    else:
                        mode = VariantAttention(model, variant, density or 1.0, args.block_size, profiles.get(variant),
                                                recall=i == 0, seed=args.seed + i)
                        with mode:
                            hits.append(correct(model, sample, device))
                        measured += mode.densities
                        recalls = recalls or mode.recalls
                    bar.update(1)
                rows.append(dict(
                    variant=variant, nominal_density=density, length=length, task=task, samples=len(hits),
                    accuracy=100.0 * sum(hits) / len(hits),
                    density=mean(measured) if measured else 1.0,
                    mass_recall_per_layer=[mean(layer) for layer in recalls] if recalls else None,
                ))
    bar.close()
    return rows


def calibrated_profiles(model, args, device: str) -> dict:
    """``{"dam-calibrated-<pcl>": profile}`` from ``dam_compile.calibrate`` on training-distribution samples."""
    profiles = {}
    pcls = args.pcls.split(",") if "dam-calibrated" in args.variants.split(",") else []
    for pcl in (int(p) for p in pcls if p):
        samples = [ft.make_sample(ft.TASKS[i % len(ft.TASKS)], pcl, (i % 5) / 4, seed=2 * 10**9 + i).prompt[None]
                   for i in range(8)]
        profiles[f"dam-calibrated-{pcl}"] = dam_compile.calibrate(model, [s.to(device) for s in samples], pcl=pcl,
                                                                   progress=False)
    return profiles


def headline(rows: list[dict], variant: str, density: float = HEADLINE_DENSITY) -> dict:
    """For ``variant`` at nominal ``density``: the largest accuracy gap to full attention and the smallest margin
    over StreamingLLM (points, over tasks and lengths), and its mean mass recall; ``None`` where rows lack."""
    def at(name, nominal):
        return {(r["length"], r["task"]): r for r in rows if r["variant"] == name and r["nominal_density"] == nominal}

    full, ours, streaming = at("full", None), at(variant, density), at("streaming", density)
    gaps = [full[k]["accuracy"] - ours[k]["accuracy"] for k in sorted(set(full) & set(ours))]
    margins = [ours[k]["accuracy"] - streaming[k]["accuracy"] for k in sorted(set(ours) & set(streaming))]
    recalls = [x for r in ours.values() if r["mass_recall_per_layer"] for x in r["mass_recall_per_layer"]]
    return {"max_gap_to_full": max(gaps) if gaps else None,
            "min_margin_over_streamingllm": min(margins) if margins else None,
            "mass_recall": mean(recalls) if recalls else None}


def summarize(rows: list[dict]) -> dict:
    """The headline fields of ``../shared/RESULTS.md`` for DAM dynamic as configured by default, at the 15%
    cap; ``by_variant`` gives the same three for every matched variant (the oracle's recall is about what any plan
    of that density can keep)."""
    ours = headline(rows, "dam-dynamic")
    summary = {f"{field}_at_15pct": value for field, value in ours.items()}
    summary["notes"] = {f"{field}_at_15pct": f"no dam-dynamic rows at {HEADLINE_DENSITY}"
                        for field, value in ours.items() if value is None}
    variants = dict.fromkeys(r["variant"] for r in rows if r["nominal_density"] == HEADLINE_DENSITY)
    summary["by_variant"] = {v: headline(rows, v) for v in variants}
    return summary


def plot(rows: list[dict], path: Path) -> Path:
    """Accuracy (mean over tasks) against measured density: one line per variant, one panel per length."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 4), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        sel = [r for r in rows if r["length"] == length]
        for variant in dict.fromkeys(r["variant"] for r in sel):
            by_density = {}
            for r in (r for r in sel if r["variant"] == variant):
                by_density.setdefault(r["nominal_density"], []).append(r)
            points = sorted((mean(r["density"] for r in g), mean(r["accuracy"] for r in g)) for g in by_density.values())
            if variant == "full":
                ax.axhline(points[0][1], color="black", linestyle="--", label="full attention")
            else:
                ax.plot(*zip(*points), marker="o", label=variant)
        ax.set_title(f"{length // 1024}K tokens" if length >= 1024 else f"{length} tokens")
        ax.set_xlabel("measured block density")
        ax.set_ylabel("accuracy (%, mean over tasks)")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # the log axis' minor labels overlap
        ax.set_xticks([0.03, 0.05, 0.1, 0.15, 0.3], labels=["3%", "5%", "10%", "15%", "30%"])
        ax.set_ylim(-2, 102)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


ROW_KEY = ("variant", "nominal_density", "length", "task")


def merge(parts: list[Path], out: Path | None) -> dict:
    """One results file from parts run on one device with one trained model (a later part's row replaces an
    earlier one of the same variant, density, length and task); summary and plot recomputed."""
    loaded, result = merged_header(parts, same={"recipe": lambda p: p["training"]["recipe"]})
    rows = {tuple(r[k] for k in ROW_KEY): r for part in loaded for r in part["rows"]}
    first = loaded[0]
    trained = [p["training"] for p in loaded if not p["training"].get("loaded")]
    result.update(
        config={**first["config"], "lengths": ",".join(
            str(n) for n in sorted({r["length"] for r in rows.values()}))},
        training=trained[0] if trained else first["training"], rows=list(rows.values()),
        summary=summarize(list(rows.values())),
    )
    path = write_result(result, "fidelity", False, out)
    plot(result["rows"], path.with_suffix(".png"))
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    import transformers

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    log = tqdm.write
    torch.manual_seed(args.seed)
    model, training = trained_model(args, device, log)
    profiles = calibrated_profiles(model, args, device)
    rows = evaluate(model, args, profiles, device)
    result = run_metadata("fidelity")
    result.update(
        transformers=transformers.__version__,
        config=dict(model=model_config(args.smoke).to_dict(), block_size=args.block_size, lengths=args.lengths,
                    densities=args.densities, samples_per_task=args.samples, tasks=list(ft.TASKS),
                    weights="trained in this benchmark on the synthetic tasks (no pretrained weights)"),
        training=training, rows=rows, summary=summarize(rows),
    )
    out = args.out or (RESULTS / "fidelity_smoke.json" if args.smoke else None)
    path = write_result(result, "fidelity", args.quick, out)
    plot(rows, path.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
