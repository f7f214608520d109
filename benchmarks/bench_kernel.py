"""Kernel benchmark: our fused block-sparse kernel vs cuDNN SDPA, flash SDPA and FlexAttention on the same plan.

    python benchmarks/bench_kernel.py                 # B=1 H=32 KVH=8 D=128 bf16 causal, N = 8K, 32K, 128K
    python benchmarks/bench_kernel.py --quick         # 8K and 32K only

Writes ``benchmarks/results/kernel_<gpu>.json`` (device, versions, date, command, every row, and the
``summary`` of ``shared/RESULTS.md``). Densities are counted over causal blocks; random plans always keep the
sink column and the diagonal block. TFLOP/s are effective: 4 * D * (kept query-key pairs), where a kept block
counts whole except on the causal diagonal, which counts half (so density 1.0 gives the usual causal FLOPs).
Times are medians of ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from tqdm import tqdm

from bench_common import bench_ms, run_metadata, write_result
from dam_compile.kernels import dense_plan, plan_density, random_plan, triton_block_sparse_attention
from dam_compile.kernels.block_sparse_launch import _tuned_kernel

SPARSE_DENSITIES = (0.3, 0.1, 0.03)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--densities", type=float, nargs="+", default=[1.0, *SPARSE_DENSITIES])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--quick", action="store_true", help="8K and 32K only")
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/kernel_<gpu>.json")
    return p.parse_args(argv)


def kept_pairs(plan, n: int) -> float:
    """Query-key pairs the plan computes, for a square causal problem (diagonal blocks count half)."""
    full = plan.full_kv_num_blocks.double().sum().item() if plan.has_full_blocks else 0.0
    partial = plan.kv_num_blocks.double().sum().item()
    heads_in_plan = plan.kv_num_blocks.shape[0] * plan.kv_num_blocks.shape[1]
    b = plan.block_size
    return (full * b * b + partial * b * b / 2) / heads_in_plan


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def flex_block_mask(plan, n: int, heads: int) -> BlockMask:
    """The identical layout as a FlexAttention BlockMask (never a dense N x N mask). One module-level mask_mod,
    so the compiled FlexAttention is not recompiled per plan."""

    def per_head(t):
        return t.expand(1, heads, *t.shape[2:]).contiguous()

    return BlockMask.from_kv_blocks(
        per_head(plan.kv_num_blocks), per_head(plan.kv_indices),
        per_head(plan.full_kv_num_blocks), per_head(plan.full_kv_indices),
        BLOCK_SIZE=plan.block_size, mask_mod=causal, seq_lengths=(n, n),
    )


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    gen = torch.Generator(device="cuda").manual_seed(0)
    h, kvh, d, block = args.heads, args.kv_heads, args.head_dim, args.block_size
    seq_lens = [n for n in args.seq_lens if n <= 32768] if args.quick else args.seq_lens
    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    cases = [(n, dens) for n in seq_lens for dens in args.densities]
    bar = tqdm(total=len(cases) + 2 * len(seq_lens), desc="kernel bench")
    start = time.perf_counter()

    def log(message: str) -> None:
        tqdm.write(f"[{time.perf_counter() - start:6.1f}s] {message}")

    for n in seq_lens:
        q = torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, kvh, n, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, kvh, n, d, device="cuda", dtype=torch.bfloat16)
        causal_flops = 4.0 * h * d * n * n / 2
        sdpa = {}
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            with sdpa_kernel([backend]):
                fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
                expected = None if name == "flash" else fn()
                sdpa[name] = bench_ms(fn, causal_flops / 5e14 * 1e3)
                if name == "cudnn":
                    reference_out = expected
            bar.update(1)
            log(f"N={n} {name} SDPA {sdpa[name]:.3f} ms")
        dense_ms = None
        for density in args.densities:
            if density >= 1.0:
                plan = dense_plan(n, n, block, True, "cuda")
            else:
                plan = random_plan(n, n, block, density, h, True, "cuda", gen)
            measured = plan_density(plan, n, n, True)
            flops = 4.0 * h * d * kept_pairs(plan, n)

            def ours():
                return triton_block_sparse_attention(q, k, v, plan, is_causal=True, enable_gqa=True, check_plan=False)

            out = ours()
            ours_ms = bench_ms(ours, flops / 5e14 * 1e3)
            config = _tuned_kernel.best_config
            log(f"N={n} d={measured:.3f} ours {ours_ms:.3f} ms")
            mask = flex_block_mask(plan, n, h)
            flex_out = flex(q, k, v, block_mask=mask, enable_gqa=True)
            log(f"N={n} d={measured:.3f} FlexAttention compiled and run once")
            flex_ms = bench_ms(lambda: flex(q, k, v, block_mask=mask, enable_gqa=True), flops / 3e14 * 1e3)
            if density >= 1.0:
                dense_ms = ours_ms
            row = {
                "seq_len": n, "density_nominal": density, "density": round(measured, 5),
                "ours_ms": ours_ms, "flex_ms": flex_ms, "cudnn_ms": sdpa["cudnn"], "flash_ms": sdpa["flash"],
                "ours_tflops": flops / ours_ms / 1e9, "flex_tflops": flops / flex_ms / 1e9,
                "cudnn_tflops": causal_flops / sdpa["cudnn"] / 1e9, "flash_tflops": causal_flops / sdpa["flash"] / 1e9,
                "speedup_vs_flex": flex_ms / ours_ms, "speedup_vs_cudnn": sdpa["cudnn"] / ours_ms,
                "speedup_vs_flash": sdpa["flash"] / ours_ms,
                "time_over_density_x_dense": None if dense_ms is None else ours_ms / (measured * dense_ms),
                "rel_err_vs_flex": rel_err(out, flex_out),
                "rel_err_vs_cudnn": rel_err(out, reference_out) if density >= 1.0 else None,
                "config": str(config),
            }
            rows.append(row)
            bar.update(1)
            log(
                f"N={n:>6} d={measured:.3f}: ours {ours_ms:8.3f} ms ({row['ours_tflops']:.0f} TF/s)  flex {flex_ms:8.3f}"
                f"  cudnn {sdpa['cudnn']:8.3f} ({row['cudnn_tflops']:.0f})  flash {sdpa['flash']:8.3f}  [{config}]"
            )
            del plan, mask, out, flex_out
        del q, k, v, reference_out
        torch.cuda.empty_cache()
    bar.close()
    return {
        **run_metadata("kernel"),
        "config": {"batch": 1, "heads": h, "kv_heads": kvh, "head_dim": d, "dtype": "bfloat16", "causal": True,
                   "block_size": block},
        "rows": rows,
        "summary": summarize(rows),
    }


def summarize(rows: list[dict]) -> dict:
    """The headline fields of shared/RESULTS.md, from this run's rows (null with a reason when not measured)."""
    notes = {}

    def row(n, dens):
        return next((r for r in rows if r["seq_len"] == n and r["density_nominal"] == dens), None)

    summary = {}
    for n, name in ((32768, "dense_vs_cudnn_32k"), (131072, "dense_vs_cudnn_128k")):
        r = row(n, 1.0)
        summary[name] = None if r is None else round(r["ours_tflops"] / r["cudnn_tflops"], 3)
        if r is None:
            notes[name] = f"N={n} at density 1.0 was not run"
    sparse = [row(131072, dens) for dens in SPARSE_DENSITIES]
    if all(r is not None and r["time_over_density_x_dense"] is not None for r in sparse):
        summary["sparse_efficiency_128k"] = round(max(r["time_over_density_x_dense"] for r in sparse), 3)
        summary["vs_flex_128k"] = round(min(r["speedup_vs_flex"] for r in sparse), 3)
    else:
        summary["sparse_efficiency_128k"] = summary["vs_flex_128k"] = None
        notes["sparse_efficiency_128k"] = notes["vs_flex_128k"] = "N=128K with densities 1.0, 0.3, 0.1, 0.03 not all run"
    summary["notes"] = notes
    return summary


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernel needs a CUDA GPU")
    write_result(run(args), "kernel", args.quick, args.out)

if __name__ == "__main__":
    main()
