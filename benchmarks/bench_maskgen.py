"""Mask-generation benchmark: what DAM's plans cost next to dense attention, and how much attention they keep.

    python benchmarks/bench_maskgen.py            # overhead at 8K, 32K, 128K; fidelity on a trained model at 8K
    python benchmarks/bench_maskgen.py --quick    # 8K and 32K, a shorter training run

Part 1, overhead (B=1 H=32 KVH=8 D=128 bf16 causal, block 128): the dynamic plan of each estimator as the
compiled graph runs it (``dam::dynamic_plan``, which compiles :func:`dynamic_block_plan` once with Inductor) and
eagerly; the headline is the default estimator with the default options; the calibrated
plan (``dam::pattern_plan``) cold (first call at a length) and cached; next to cuDNN SDPA dense attention.

Part 2, fidelity: pretrained weights cannot be downloaded here, so the run trains a small Llama
(``LlamaForCausalLM`` from a config: 4 layers, hidden 256, 8 query / 2 KV heads) for a few hundred steps on
synthetic text with local structure (words from a fixed dictionary), copied segments (which need induction
heads) and a BOS token, then captures every layer's own Q and K (after RoPE) at 8K tokens on a held-out
sequence. Per variant and density cap it reports the attention-mass recall (``dam_compile.metrics``) and the
measured density: dynamic DAM with each estimator, StreamingLLM at the same density, and the oracle (top blocks
by exact mass, same per-row budget: an upper bound).

Writes ``benchmarks/results/maskgen_<gpu>.json`` with the ``summary`` of ``shared/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from tqdm import tqdm

from bench_common import bench_ms, run_metadata, write_result
from bench_plans import density_matched_streaming_plan
from dam_compile.plan.block_plan import BlockSparsePlan
from dam_compile.plan.reference import plan_density
from dam_compile.config import DAMConfig
from dam_compile.dynamic.dynamic_plan import dynamic_block_plan
from dam_compile.dynamic.estimators import DEFAULT_ESTIMATOR, ESTIMATORS
from dam_compile.ops.attention import dynamic_plan_op, pattern_plan_op
from dam_compile.plan.pattern_plan import clear_pattern_plan_cache
from dam_compile.metrics import attention_mass_recall, top_mass_plan

DENSITIES = (0.05, 0.1, 0.15, 0.3)
HEADLINE_DENSITY = 0.15


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--train-steps", type=int, default=3000)
    p.add_argument("--train-len", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="8K and 32K, 300 training steps")
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/maskgen_<gpu>.json")
    return p.parse_args(argv)


# ---------------------------------------------------------------- part 1: overhead


def synthetic_profile_patterns(heads: int, pcl: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Patterns shaped like a calibrated profile's: per head 16 diagonals (0..7 and 8 spread ones), 4 columns
    (0 and 3 more), a lower-triangular corner."""
    g = torch.Generator().manual_seed(1)
    diagonals, columns = [], []
    for _ in range(heads):
        spread = torch.randperm(pcl - 8, generator=g)[:8] + 8
        diagonals.append(torch.cat([torch.arange(8), spread]).sort().values)
        columns.append(torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(pcl - 1, generator=g)[:3] + 1]).sort().values)
    corner = torch.ones(heads, pcl, pcl, dtype=torch.bool).tril()
    as_int = lambda rows: torch.stack(rows).to(torch.int32).to(device)  # noqa: E731
    return as_int(diagonals), as_int(columns), corner.to(device)


def overhead_rows(args, log) -> list[dict]:
    h, kvh, d, block = 32, 8, 128, args.block_size
    rows = []
    for n in args.seq_lens:
        q = torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, kvh, n, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            cudnn_ms = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        row = {"seq_len": n, "cudnn_ms": cudnn_ms}
        # The graph runs the op, which compiles its plan once with dynamic shapes (Inductor); each estimator
        # also runs eagerly.
        for estimator in ESTIMATORS:
            defaults = DAMConfig(estimator=estimator).mask_options()  # the estimator's own density default
            plan_fn = functools.partial(dynamic_block_plan, block_size=block, is_causal=True, estimator=estimator,
                                        density=defaults.density)
            row[f"dynamic_{estimator}_eager_ms"] = bench_ms(lambda: plan_fn(q, k))
            op = lambda: dynamic_plan_op(  # noqa: E731
                q, k, block, True, 0, "auto", None, defaults.tau, defaults.box_cox_lambda, defaults.mu,
                defaults.density, defaults.mass_target, defaults.sink_blocks, defaults.local_blocks, estimator)
            op()
            row[f"dynamic_{estimator}_ms"] = bench_ms(op)
        diagonals, columns, corner = synthetic_profile_patterns(h, 128, q.device)
        call = lambda: pattern_plan_op(q, k, diagonals, columns, corner, block, True, 0, "auto")  # noqa: E731
        clear_pattern_plan_cache()
        torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        torch.cuda.synchronize()
        row["calibrated_build_ms"] = (time.perf_counter() - start) * 1e3
        row["calibrated_cached_ms"] = bench_ms(call)
        for key in [k for k in row if k.endswith("_ms") and k != "cudnn_ms"]:
            row[key.removesuffix("_ms") + "_over_dense"] = round(row[key] / cudnn_ms, 4)
        rows.append(row)
        compiled = ", ".join(f"{e} {row[f'dynamic_{e}_ms']:.3f} ms ({row[f'dynamic_{e}_over_dense']:.2%})"
                             for e in ESTIMATORS)
        log(f"N={n}: cuDNN {cudnn_ms:.3f} ms; dynamic plan op: {compiled}; "
            f"calibrated cached {row['calibrated_cached_ms']:.3f} ms, build {row['calibrated_build_ms']:.1f} ms")
        del q, k, v
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------- part 2: fidelity on a trained model

VOCAB, WORDS, WORD_LEN, BOS = 512, 1024, 6, 0


def synthetic_text(batch: int, length: int, gen: torch.Generator, device) -> torch.Tensor:
    """Token ids ``[batch, length]``: BOS, then words of a fixed dictionary (Zipf-distributed) with two copied
    segments of 256 tokens each (the second occurrence is predictable only by looking back at the first)."""
    dictionary = torch.randint(1, VOCAB, (WORDS, WORD_LEN), generator=torch.Generator().manual_seed(123))
    zipf = 1.0 / torch.arange(1, WORDS + 1, dtype=torch.float64)
    words = torch.multinomial(zipf, batch * (length // WORD_LEN + 1), replacement=True, generator=gen)
    tokens = dictionary[words].view(batch, -1)[:, :length].clone()
    for b in range(batch):
        for _ in range(2):
            src = int(torch.randint(1, length // 2 - 256, (1,), generator=gen))
            dst = int(torch.randint(src + 256, length - 256, (1,), generator=gen))
            tokens[b, dst:dst + 256] = tokens[b, src:src + 256]
    tokens[:, 0] = BOS
    return tokens.to(device)


def train_model(args, log):
    import transformers

    torch.manual_seed(args.seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=args.train_len, rope_theta=10000.0, attn_implementation="sdpa",
    )
    model = transformers.LlamaForCausalLM(config).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    steps = 300 if args.quick else args.train_steps
    losses, start = [], time.perf_counter()
    for step in tqdm(range(steps), desc="train", leave=False):
        x = synthetic_text(2, args.train_len, gen, "cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for group in opt.param_groups:
            group["lr"] = 1e-3 * min(1.0, (step + 1) / 50)
        losses.append(loss.item())
    log(f"trained {steps} steps in {time.perf_counter() - start:.0f} s: loss {losses[0]:.2f} -> {losses[-1]:.2f}")
    info = {"config": config.to_dict(), "steps": steps, "train_len": args.train_len, "batch": 2,
            "loss_first": losses[0], "loss_last": sum(losses[-20:]) / 20, "seconds": time.perf_counter() - start}
    return model.eval(), info


class QKCapture(TorchFunctionMode):
    """Keeps the query and key of every SDPA call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.calls.append((args[0].detach(), args[1].detach()))
        return func(*args, **kwargs)


def fidelity_rows(args, log) -> tuple[list[dict], dict]:
    model, info = train_model(args, log)
    capture = QKCapture()
    gen = torch.Generator().manual_seed(args.seed + 1000)
    x = synthetic_text(1, args.train_len, gen, "cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16), capture:
        model(input_ids=x)
    block, n = args.block_size, args.train_len
    rows = []
    for layer, (q, k) in enumerate(tqdm(capture.calls, desc="fidelity", leave=False)):
        q, k = q.to(torch.bfloat16), k.to(torch.bfloat16)
        for cap in DENSITIES:
            plans = {}
            for estimator in ESTIMATORS:
                counts, idx, fcounts, fidx = dynamic_block_plan(
                    q, k, block_size=block, is_causal=True, density=cap, estimator=estimator)
                plans[f"dam_dynamic_{estimator}"] = BlockSparsePlan(counts, idx, block, fcounts, fidx)
            default = plans[f"dam_dynamic_{DEFAULT_ESTIMATOR}"]
            measured = plan_density(default, n, n, True)
            plans["streaming_llm"] = density_matched_streaming_plan(n, block, measured, q.device)
            plans["oracle_top_mass"] = top_mass_plan(q, k, block, default.kept_blocks())
            for name, plan in plans.items():
                recall = attention_mass_recall(q, k, plan, is_causal=True, enable_gqa=True)
                rows.append({
                    "layer": layer, "density_cap": cap, "variant": name,
                    "density": plan_density(plan, n, n, True),
                    "mass_recall": float(recall.mean()), "mass_recall_min_head": float(recall.min()),
                })
    for cap in DENSITIES:
        for name in sorted({r["variant"] for r in rows}):
            sel = [r for r in rows if r["density_cap"] == cap and r["variant"] == name]
            log(f"cap {cap:.2f} {name:24s} density {sum(r['density'] for r in sel) / len(sel):.3f} "
                f"recall {sum(r['mass_recall'] for r in sel) / len(sel):.3f}")
    return rows, info


def headline_estimator(result: dict) -> str:
    """The estimator a results file's headline measures: the default when it ran (files written before the
    field, when ``adaptive`` was the default, say nothing)."""
    return result.get("default_estimator", "adaptive")


def summarize(overhead: list[dict], fidelity: list[dict], estimator: str = DEFAULT_ESTIMATOR) -> dict:
    notes, summary = {}, {}
    for n, name in ((32768, "overhead_vs_dense_32k"), (131072, "overhead_vs_dense_128k")):
        row = next((r for r in overhead if r["seq_len"] == n), None)
        summary[name] = None if row is None else row[f"dynamic_{estimator}_over_dense"]
        if row is None:
            notes[name] = f"N={n} was not run (--quick)"
    sel = [r for r in fidelity
           if r["density_cap"] == HEADLINE_DENSITY and r["variant"] == f"dam_dynamic_{estimator}"]
    if not sel:
        summary["mass_recall_at_15pct"] = summary["density_at_15pct_cap"] = None
        notes["mass_recall_at_15pct"] = notes["density_at_15pct_cap"] = "part 2 (fidelity) has not finished"
        summary["notes"] = notes
        return summary
    density = sum(r["density"] for r in sel) / len(sel)
    summary["mass_recall_at_15pct"] = round(sum(r["mass_recall"] for r in sel) / len(sel), 4)
    summary["density_at_15pct_cap"] = round(density, 4)
    notes["mass_recall_at_15pct"] = (
        f"dynamic DAM ({estimator} estimator, defaults, density cap 0.15) on the Q/K of a small Llama "
        "trained in this "
        "run on synthetic text (no pretrained weights can be downloaded here), 8K tokens, mean over layers and heads"
    )
    summary["notes"] = notes
    return summary


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_maskgen needs a CUDA GPU")
    if args.quick:
        args.seq_lens = [n for n in args.seq_lens if n <= 32768]
    start = time.perf_counter()
    log = lambda m: tqdm.write(f"[{time.perf_counter() - start:6.1f}s] {m}")  # noqa: E731
    result = {
        **run_metadata("maskgen"),
        "default_estimator": DEFAULT_ESTIMATOR,
        "config": {"heads": 32, "kv_heads": 8, "head_dim": 128, "dtype": "bfloat16", "causal": True,
                   "block_size": args.block_size, "densities": DENSITIES, "seed": args.seed},
    }
    overhead = overhead_rows(args, log)
    # Written after each part, so a run cut short keeps what it measured.
    result.update(overhead=overhead, fidelity=[], training=None, summary=summarize(overhead, []))
    write_result(result, "maskgen", args.quick, args.out)
    fidelity, training = fidelity_rows(args, log)
    result.update(fidelity=fidelity, training=training, summary=summarize(overhead, fidelity))
    write_result(result, "maskgen", args.quick, args.out)


if __name__ == "__main__":
    main()
