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

Accuracy is exact match of the answer tokens (teacher-forced: every answer token is the argmax given the
right prefix, which is what greedy decoding produces when it is right).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path
from statistics import mean

import torch
from tqdm import tqdm

import fidelity_tasks as ft
from bench_common import RESULTS, run_metadata, write_result

import dam_compile
from dam_compile.config import DAMConfig
from dam_compile.kernels import BlockSparsePlan, plan_density
from dam_compile.kernels.structured_plans import causal_block_tables, density_matched_streaming_plan, random_plan
from dam_compile.metrics import attention_mass_recall, top_mass_plan
from dam_compile.module_stack import AttentionCallMode
from dam_compile.reference_mode import plan_for

DENSITIES = (0.05, 0.10, 0.15, 0.30)
MATCHED = ("dam-dynamic", "streaming", "oracle", "random")  # run at each density
HEADLINE_DENSITY = 0.15


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="4096,8192,16384", help="evaluation prompt lengths")
    p.add_argument("--train-lengths", default="1024,2048,4096,8192,16384", help="curriculum, shortest first")
    p.add_argument("--train-steps", type=int, default=1500)
    p.add_argument("--train-tokens", type=int, default=65536, help="tokens per training step")
    p.add_argument("--samples", type=int, default=12, help="samples per (task, length), depths 0..1")
    p.add_argument("--densities", default=",".join(map(str, DENSITIES)))
    p.add_argument("--pcls", default="128,512", help="calibration lengths of the calibrated profiles")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "dam_compile" / "fidelity")
    p.add_argument("--quick", action="store_true", help="8K only, 4 samples per task")
    p.add_argument("--smoke", action="store_true", help="CPU pipeline check: tiny model, 256 tokens, no claims")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
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
    recipe = dict(config=config.to_dict(), steps=args.train_steps, tokens=args.train_tokens,
                  lengths=args.train_lengths, seed=args.seed)
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = args.cache_dir / f"fidelity_{key}.safetensors"
    torch.manual_seed(args.seed)
    model = transformers.LlamaForCausalLM(config).to(device)
    if path.is_file():
        model.load_state_dict(load_file(str(path), device=device))
        log(f"loaded trained weights from {path}")
        return model.eval(), {"recipe": recipe, "cached": str(path), "loaded": True}
    info = train(model, args, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    log(f"trained {args.train_steps} steps in {info['seconds']:.0f} s: loss {info['loss_first']:.3f} -> "
        f"{info['loss_last']:.3f}; cached at {path}")
    return model.eval(), {"recipe": recipe, "cached": str(path), "loaded": False, **info}


def train(model, args, device: str) -> dict:
    """AdamW with warmup and cosine decay; the curriculum spends equal steps on each length, shortest first;
    the loss is on answer tokens only."""
    lengths = [int(n) for n in args.train_lengths.split(",")]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, args.train_steps // 20)
    losses, start = [], time.perf_counter()
    model.train()
    for step in tqdm(range(args.train_steps), desc="train", leave=False):
        length = lengths[min(len(lengths) - 1, step * len(lengths) // args.train_steps)]
        ids, labels = ft.training_batch(max(1, args.train_tokens // length), length, seed=args.seed * 10**6 + step)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=ids.to(device), labels=labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.train_steps))
        for group in opt.param_groups:
            group["lr"] = 1e-3 * max(scale, 0.05)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    tail = losses[-max(1, len(losses) // 10):]
    return {"seconds": time.perf_counter() - start, "loss_first": losses[0], "loss_last": mean(tail), "losses": losses}


class VariantAttention(AttentionCallMode):
    """Runs every causal self-attention call of the model through ``dam_compile.sparse_attention`` with the
    variant's plan; records each plan's measured density and, when asked, its attention-mass recall."""

    def __init__(self, model, variant: str, density: float, block: int, profile=None, recall: bool = False,
                 seed: int = 0):
        super().__init__(model)
        self.variant, self.density, self.block, self.profile = variant, density, block, profile
        # DAM variants use the plan ops the pass inserts, as users run them.
        self.config = DAMConfig(block_size=block, min_seq_len=0, kernel="reference", density=density, profile=profile,
                                mask_source="calibrated" if profile is not None else "dynamic")
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
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=len(sample.answer)).logits
    return bool(torch.equal(logits[0].argmax(-1).cpu(), sample.answer))


def evaluate(model, args, profiles: dict, device: str) -> list[dict]:
    """One row per (variant, density, length, task): accuracy, measured density, mass recall (first sample)."""
    densities = [float(d) for d in args.densities.split(",")]
    cases = [("full", None)] + [(v, d) for v in MATCHED for d in densities] + [(v, None) for v in profiles]
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
    for pcl in (int(p) for p in args.pcls.split(",") if p):
        samples = [ft.make_sample(ft.TASKS[i % len(ft.TASKS)], pcl, (i % 5) / 4, seed=2 * 10**9 + i).prompt[None]
                   for i in range(8)]
        profiles[f"dam-calibrated-{pcl}"] = dam_compile.calibrate(model, [s.to(device) for s in samples], pcl=pcl,
                                                                   progress=False)
    return profiles


def summarize(rows: list[dict]) -> dict:
    """The headline fields of ``../shared/RESULTS.md`` (DAM dynamic at the 15% cap), with notes."""
    def at(variant, density=HEADLINE_DENSITY):
        return {(r["length"], r["task"]): r for r in rows if r["variant"] == variant
                and (r["nominal_density"] == density or density is None)}

    full, dam, streaming = at("full", None), at("dam-dynamic"), at("streaming")
    keys = sorted(set(full) & set(dam))
    summary, notes = {}, {}
    if keys:
        summary["max_gap_to_full_at_15pct"] = max(full[k]["accuracy"] - dam[k]["accuracy"] for k in keys)
    else:
        summary["max_gap_to_full_at_15pct"], notes["max_gap_to_full_at_15pct"] = None, "no dam-dynamic rows at 0.15"
    both = sorted(set(dam) & set(streaming))
    summary["min_margin_over_streamingllm_at_15pct"] = (
        min(dam[k]["accuracy"] - streaming[k]["accuracy"] for k in both) if both else None)
    if not both:
        notes["min_margin_over_streamingllm_at_15pct"] = "no streaming rows at 0.15"
    recalls = [x for r in dam.values() if r["mass_recall_per_layer"] for x in r["mass_recall_per_layer"]]
    summary["mass_recall_at_15pct"] = mean(recalls) if recalls else None
    if not recalls:
        notes["mass_recall_at_15pct"] = "no recall measured at 0.15"
    summary["notes"] = notes
    return summary


def plot(rows: list[dict], path: Path) -> Path:
    """Accuracy (mean over tasks) against measured density: one line per variant, one panel per length."""
    import matplotlib

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
        ax.set_ylim(-2, 102)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    log = tqdm.write
    torch.manual_seed(args.seed)
    model, training = trained_model(args, device, log)
    profiles = calibrated_profiles(model, args, device)
    rows = evaluate(model, args, profiles, device)
    result = run_metadata("fidelity")
    result.update(
        config=dict(model=model_config(args.smoke).to_dict(), block_size=args.block_size, lengths=args.lengths,
                    densities=args.densities, samples_per_task=args.samples, tasks=list(ft.TASKS),
                    weights="trained in this benchmark on the synthetic tasks (no pretrained weights)"),
        training={k: v for k, v in training.items() if k != "losses"}, rows=rows, summary=summarize(rows),
    )
    out = args.out or (RESULTS / "fidelity_smoke.json" if args.smoke else None)
    path = write_result(result, "fidelity", args.quick, out)
    plot(rows, path.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
