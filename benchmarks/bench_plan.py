"""What the default dynamic plan costs, stage by stage, and where sparse attention starts to beat dense (issue 38).

    python bench_plan.py                 # on a GPU: stages, crossover, decode crossover
    python bench_plan.py --parts stages --lengths 8192

Shapes: SmolLM2-135M's attention (H=9, KVH=3, D=64) and Llama-3.1-8B's (H=32, KVH=8, D=128), B=1, bf16, causal,
block 128, default options (``estimator="sampled"``, mass 0.99, no cap).

- ``stages``: per shape and length, the plan through ``dam::dynamic_plan``'s previous path (the PyTorch definition
  compiled once with Inductor) and through the fused Triton kernels (``kernels/sampled_plan_kernel.py``): GPU
  time of each kernel (``torch.profiler``, summed per call), launches per call, host CPU time per call, and the
  wall time of one call; beside them dense cuDNN attention and our sparse kernel at densities 0.3 and 0.5.
- ``crossover``: dense SDPA (cuDNN first) against plan + sparse attention at a fixed density (random Q/K keep
  nearly every block under a mass rule, so the attention runs on a plan of the given density), at lengths from
  2K to 32K: the measured dense work below which ``kernel="auto"`` runs dense (``kernels/dispatch.py``).
- ``decode``: one decode step, dense SDPA against the dynamic decode plan + the sparse decode kernel.

Writes ``benchmarks/results/plan_<gpu>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import time
from statistics import median
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench_common import bench_ms, int_list, run_metadata, synced_wall_ms, write_result
from bench_plans import random_plan
from dam_compile.plan.block_plan import BlockSparsePlan
from dam_compile.plan.reference import plan_density
from dam_compile.ops.attention import sparse_attention
from dam_compile.dynamic.dynamic_plan import dynamic_block_plan
from dam_compile.ops.attention import dense_attention
from dam_compile.dynamic.sampled_plan_kernel import sampled_block_plan
from dam_compile.config import DAMConfig

SHAPES = {"smollm2": (9, 3, 64), "llama-8b": (32, 8, 128)}  # heads, KV heads, head dim
STAGE_LENGTHS = {"smollm2": (8192, 32768), "llama-8b": (32768, 131072)}
CROSSOVER_LENGTHS = (2048, 4096, 8192, 16384, 32768)
DECODE_LENGTHS = (32768, 131072)
DENSITIES = (0.3, 0.5)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="stages,crossover,decode")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--lengths", default="", help="stage lengths for every shape (default: per shape)")
    p.add_argument("--old", action=argparse.BooleanOptionalAction, default=True,
                   help="time the previous path (the compiled definition) too")
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def log(text: str) -> None:
    print(text, flush=True)


def plan_options() -> dict:
    """The default config's dynamic-plan arguments (after query and key)."""
    o = DAMConfig().mask_options()
    return dict(block_size=o.block_size, is_causal=True, scale=None, tau=o.tau, box_cox_lambda=o.box_cox_lambda,
                mu=o.mu, density=o.density, mass_target=o.mass_target, sink_blocks=o.sink_blocks,
                local_blocks=o.local_blocks)


def tensors(shape: str, length: int, q_len: int | None = None):
    heads, kv_heads, dim = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(length)
    make = lambda h, n: torch.randn(1, h, n, dim, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    return make(heads, q_len or length), make(kv_heads, length), make(kv_heads, length)


def kernel_profile(fn, runs: int = 10) -> dict:
    """Per call: GPU microseconds per kernel name, and the number of launches."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            fn()
        torch.cuda.synchronize()
    kernels, launches = {}, 0
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if event.device_type == torch.autograd.DeviceType.CUDA and us > 0:
            kernels[event.key[:60]] = round(us / runs, 2)
            launches += event.count
    return {"kernel_us": dict(sorted(kernels.items(), key=lambda kv: -kv[1])),
            "gpu_us": round(sum(kernels.values()), 1), "launches": launches / runs}


def host_us(fn, calls: int = 30) -> float:
    """Least CPU time of the calling thread per call over 5 loops (the GPU's queue never fills)."""
    fn()
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.thread_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.thread_time() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return round(best, 1)


def wall_ms(fn, runs: int = 20) -> float:
    """Median wall milliseconds of one synchronised call (host and GPU, nothing overlapped)."""
    return round(median(synced_wall_ms(fn, runs)), 3)


def density_of(lists, length: int, block_size: int) -> float:
    """Mean block density of plan lists ``(counts, indices, full counts, full indices)``, causal and square."""
    return plan_density(BlockSparsePlan(lists[0], lists[1], block_size, lists[2], lists[3]), length, length, True)


def stage_rows(shapes: list[str], lengths: list[int], old: bool) -> list[dict]:
    from dam_compile.ops.attention import compiled_planner

    options = plan_options()
    rows = []
    for shape in shapes:
        heads = SHAPES[shape][0]
        for n in lengths or STAGE_LENGTHS[shape]:
            q, k, v = tensors(shape, n)
            dense = lambda: dense_attention(q, k, v, None, None, True, True)  # noqa: E731
            fused = lambda: sampled_block_plan(q, k, **options)  # noqa: E731
            row = {"shape": shape, "seq_len": n, "dense_ms": bench_ms(dense)}
            row["fused"] = dict(kernel_profile(fused), host_us=host_us(fused), wall_ms=wall_ms(fused),
                                plan_ms=bench_ms(fused), density_random_qk=round(density_of(fused(), n, options["block_size"]), 3))
            if old:
                compiled = compiled_planner(dynamic_block_plan, q.device)
                definition = lambda: compiled(q, k, estimator="sampled", **options)  # noqa: E731
                definition()  # compile
                row["compiled_definition"] = dict(kernel_profile(definition), host_us=host_us(definition),
                                                  wall_ms=wall_ms(definition))
            for d in DENSITIES:
                plan = random_plan(n, n, options["block_size"], d, heads, True, "cuda",
                                   torch.Generator(device="cuda").manual_seed(3))
                row[f"sparse_ms_{d}"] = bench_ms(lambda: sparse_attention(q, k, v, plan, is_causal=True,
                                                                          enable_gqa=True))
            row["fused_share_of_dense"] = row["fused"]["plan_ms"] / row["dense_ms"]
            rows.append(row)
            log(f"{shape} {n}: dense {row['dense_ms']:.3f} ms; fused plan {row['fused']['plan_ms']:.3f} ms "
                f"({row['fused_share_of_dense']:.1%} of dense; kernels {row['fused']['gpu_us']:.0f} us), "
                f"{row['fused']['launches']:.0f} launches, host "
                f"{row['fused']['host_us']:.0f} us, wall {row['fused']['wall_ms']:.3f} ms"
                + (f"; compiled definition GPU {row['compiled_definition']['gpu_us']:.0f} us, "
                   f"{row['compiled_definition']['launches']:.0f} launches, host "
                   f"{row['compiled_definition']['host_us']:.0f} us, wall {row['compiled_definition']['wall_ms']:.3f}"
                   if old else ""))
            log("  fused kernels: " + ", ".join(f"{name} {us}" for name, us in row["fused"]["kernel_us"].items()))
            del q, k, v
            torch.cuda.empty_cache()
    return rows


def crossover_rows(shapes: list[str]) -> list[dict]:
    options = plan_options()
    rows = []
    for shape in shapes:
        heads, _, dim = SHAPES[shape]
        for n in CROSSOVER_LENGTHS:
            q, k, v = tensors(shape, n)
            row = {"shape": shape, "seq_len": n, "work": n * n * heads * dim,
                   "dense_ms": bench_ms(lambda: dense_attention(q, k, v, None, None, True, True))}
            for d in DENSITIES:
                plan = random_plan(n, n, options["block_size"], d, heads, True, "cuda",
                                   torch.Generator(device="cuda").manual_seed(3))

                def sparse_call():
                    sampled_block_plan(q, k, **options)
                    return sparse_attention(q, k, v, plan, is_causal=True, enable_gqa=True)

                row[f"plan_and_sparse_ms_{d}"] = bench_ms(sparse_call)
                row[f"speedup_{d}"] = row["dense_ms"] / row[f"plan_and_sparse_ms_{d}"]
            rows.append(row)
            log(f"crossover {shape} {n} (work {row['work']:.2e}): dense {row['dense_ms']:.3f} ms; plan+sparse "
                + ", ".join(f"d={d}: {row[f'plan_and_sparse_ms_{d}']:.3f} ({row[f'speedup_{d}']:.2f}x)"
                            for d in DENSITIES))
    return rows


def decode_rows(shapes: list[str]) -> list[dict]:
    o = DAMConfig().mask_options()
    rows = []
    for shape in shapes:
        for n in DECODE_LENGTHS:
            q, k, v = tensors(shape, n, q_len=1)

            def sparse_step():
                counts, indices = torch.ops.dam.decode_plan(q, k, None, None, None, **dict(
                    o.decode_plan_kwargs(None), min_seq_len=0))
                return torch.ops.dam.sparse_attention(q, k, v, counts, indices, None, None, None, None, None, None,
                                                      None, True, True, o.block_size, 0, "auto")

            dense = lambda: dense_attention(q, k, v, None, None, False, True)  # noqa: E731
            row = {"shape": shape, "kv_len": n, "kv_bytes": 2 * k.numel() * k.element_size(),
                   "dense_us": bench_ms(dense) * 1e3, "sparse_us": bench_ms(sparse_step) * 1e3,
                   "sparse_host_us": host_us(sparse_step), "sparse_kernels": kernel_profile(sparse_step)}
            rows.append(row)
            log(f"decode {shape} {n} ({row['kv_bytes'] / 2**20:.0f} MiB K/V): dense {row['dense_us']:.1f} us, plan + "
                f"sparse {row['sparse_us']:.1f} us (host {row['sparse_host_us']:.0f} us, "
                f"{row['sparse_kernels']['launches']:.0f} launches)")
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    shapes, parts = args.shapes.split(","), args.parts.split(",")
    result = {**run_metadata("plan"), "defaults": DAMConfig().describe()}
    if "stages" in parts:
        result["stages"] = stage_rows(shapes, int_list(args.lengths), args.old)
    if "crossover" in parts:
        result["crossover"] = crossover_rows(shapes)
    if "decode" in parts:
        result["decode"] = decode_rows(shapes)
    result["summary"] = summarize(result)
    write_result(result, "plan", False, args.out)
    return result


def summarize(result: dict) -> dict:
    """The default plan's time over dense cuDNN attention's (8B shape: the ``overhead_vs_dense`` targets of
    ../shared/RESULTS.md's maskgen section, <= 0.10 at 32K and <= 0.05 at 128K in issue 38) and the crossover."""
    summary, notes = {}, {}
    stages = {(r["shape"], r["seq_len"]): r for r in result.get("stages", [])}
    for n, tag in ((32768, "32k"), (131072, "128k")):
        row = stages.get(("llama-8b", n))
        summary[f"overhead_vs_dense_{tag}"] = row and round(row["fused_share_of_dense"], 4)
        if row is None:
            notes[f"overhead_vs_dense_{tag}"] = f"the stages part did not run the 8B shape at {n}"
    for d in DENSITIES:
        wins = [r["work"] for r in result.get("crossover", []) if r[f"speedup_{d}"] > 1.0]
        summary[f"crossover_work_at_density_{d}"] = min(wins) if wins else None
        if not wins:
            notes[f"crossover_work_at_density_{d}"] = "plan + sparse never beat dense in the crossover part"
    summary["notes"] = notes
    return summary


if __name__ == "__main__":
    main()
