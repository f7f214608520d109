"""Kernel benchmark: our fused block-sparse kernel vs cuDNN SDPA, flash SDPA and FlexAttention on the same plan.

    python benchmarks/bench_kernel.py                 # B=1 H=32 KVH=8 D=128 bf16 causal, N = 8K, 32K, 128K
    python benchmarks/bench_kernel.py --quick         # 8K and 32K only
    python benchmarks/bench_kernel.py --parts host,decode   # only the host-time and decode parts

Parts: ``attention`` (the table below), ``items`` (what a work item costs apart from its key blocks, ours and
FlexAttention: plans keeping a fixed number of blocks per row at 32K), ``host`` (CPU microseconds per call
through ``torch.ops.dam.sparse_attention`` at 8K, a 10% plan: the launch path without CUDA graphs) and
``decode`` (the decode kernel over kept blocks of a 32K and 128K KV cache: bytes of kept K/V read per second,
against this GPU's copy bandwidth measured in the same run, beside a kernel that only reads those blocks).

Writes ``benchmarks/results/kernel_<gpu>.json`` (device, versions, date, command, every row, and the
``summary`` of ``shared/RESULTS.md``). Densities are counted over causal blocks; random plans always keep the
sink column and the diagonal block. TFLOP/s are effective: 4 * D * (kept query-key pairs), where a kept block
counts whole except on the causal diagonal, which counts half (so density 1.0 gives the usual causal FLOPs).
Times are medians of ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs).
"""

from __future__ import annotations

import argparse
import time
from statistics import median
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from tqdm import tqdm

from bench_common import bench_ms, run_metadata, write_result
from bench_plans import fixed_count_plan, random_plan
from dam_compile.plan.structured_plans import dense_plan
from dam_compile.plan.reference import plan_density
from dam_compile.ops.attention import sparse_attention
from dam_compile.kernels.block_sparse_launch import triton_block_sparse_attention
from dam_compile.kernels.block_sparse_launch import tuned_kernel
from dam_compile.kernels.decode_kernel import triton_sparse_decode
from dam_compile.kernels.hopper_launch import (
    BLOCK_M,
    BLOCK_N,
    NUM_STAGES,
    hopper_args,
    hopper_constants,
    hopper_unsupported,
    launch_hopper,
)
from dam_compile.kernels.common import CallShape
from read_ceiling import KeptBlockReader

HOPPER_CONFIG = (f"hopper: 2 consumer warpgroups x {BLOCK_M} rows, {BLOCK_N}-key tiles, {NUM_STAGES} stages, "
                 "persistent grid")

SPARSE_DENSITIES = (0.3, 0.1, 0.03)
PARTS = ("attention", "items", "host", "decode")
ITEM_BLOCKS = (2, 4, 8, 16, 32)  # kept blocks per query-block row in the items part
DECODE_DENSITIES = (1.0, 0.1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--densities", type=float, nargs="+", default=[1.0, *SPARSE_DENSITIES])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--quick", action="store_true", help="8K and 32K only")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated, of " + ", ".join(PARTS))
    p.add_argument("--decode-kv", type=int, nargs="+", default=[32768, 131072])
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


STARTED = time.perf_counter()


def log(message: str) -> None:
    tqdm.write(f"[{time.perf_counter() - STARTED:6.1f}s] {message}")


def run(args: argparse.Namespace) -> dict:
    parts = [part for part in args.parts.split(",") if part]
    if unknown := set(parts) - set(PARTS):
        raise SystemExit(f"--parts: unknown {sorted(unknown)}; choose from {', '.join(PARTS)}")
    torch.manual_seed(0)
    rows = attention_rows(args) if "attention" in parts else []
    host = host_time(args) if "host" in parts else None
    items = item_cost(args) if "items" in parts else None
    decode = decode_rows(args) if "decode" in parts else []
    return {
        **run_metadata("kernel"),
        "config": {"batch": 1, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                   "dtype": "bfloat16", "causal": True, "block_size": args.block_size, "parts": parts},
        "rows": rows,
        "items": items,
        "host": host,
        "decode": decode,
        "summary": summarize(rows, host, decode),
    }


def attention_rows(args: argparse.Namespace) -> list[dict]:
    """Ours, FlexAttention on the same plan, cuDNN and flash SDPA, per length and density."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    h, kvh, d, block = args.heads, args.kv_heads, args.head_dim, args.block_size
    seq_lens = [n for n in args.seq_lens if n <= 32768] if args.quick else args.seq_lens
    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    cases = [(n, dens) for n in seq_lens for dens in args.densities]
    bar = tqdm(total=len(cases) + 2 * len(seq_lens), desc="kernel bench")
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

            def ours(path=None):
                return triton_block_sparse_attention(q, k, v, plan, is_causal=True, enable_gqa=True, check_plan=False,
                                                     path=path)

            path = "portable" if hopper_unsupported(q, k, v, plan, None) else "hopper"
            out = ours()
            ours_ms = bench_ms(ours, flops / 5e14 * 1e3)
            log(f"N={n} d={measured:.3f} ours ({path}) {ours_ms:.3f} ms")
            portable_ms, portable_out, per_tile_ms = ours_ms, out, None
            if path == "hopper":  # the portable kernel side by side (what other GPUs run), and one CTA per tile
                portable_out = ours("portable")
                portable_ms = bench_ms(lambda: ours("portable"), flops / 5e14 * 1e3)
                per_tile_ms = bench_ms(lambda: per_tile_launch(q, k, v, plan), flops / 5e14 * 1e3)
                log(f"N={n} d={measured:.3f} portable {portable_ms:.3f} ms, one CTA per tile {per_tile_ms:.3f} ms")
            config = HOPPER_CONFIG if path == "hopper" else str(tuned_kernel.best_config)
            mask = flex_block_mask(plan, n, h)
            flex_out = flex(q, k, v, block_mask=mask, enable_gqa=True)
            log(f"N={n} d={measured:.3f} FlexAttention compiled and run once")
            flex_ms = bench_ms(lambda: flex(q, k, v, block_mask=mask, enable_gqa=True), flops / 3e14 * 1e3)
            if density >= 1.0:
                dense_ms = ours_ms
            row = {
                "seq_len": n, "density_nominal": density, "density": round(measured, 5),
                "path": path, "ours_ms": ours_ms, "portable_ms": portable_ms, "per_tile_grid_ms": per_tile_ms,
                "flex_ms": flex_ms, "cudnn_ms": sdpa["cudnn"], "flash_ms": sdpa["flash"],
                "ours_tflops": flops / ours_ms / 1e9, "flex_tflops": flops / flex_ms / 1e9,
                "cudnn_tflops": causal_flops / sdpa["cudnn"] / 1e9, "flash_tflops": causal_flops / sdpa["flash"] / 1e9,
                "speedup_vs_flex": flex_ms / ours_ms, "speedup_vs_cudnn": sdpa["cudnn"] / ours_ms,
                "speedup_vs_flash": sdpa["flash"] / ours_ms,
                "time_over_density_x_dense": None if dense_ms is None else ours_ms / (measured * dense_ms),
                "rel_err_vs_flex": rel_err(out, flex_out),
                "rel_err_portable_vs_flex": rel_err(portable_out, flex_out) if path == "hopper" else None,
                "rel_err_vs_cudnn": rel_err(out, reference_out) if density >= 1.0 else None,
                "config": config,
            }
            rows.append(row)
            bar.update(1)
            log(
                f"N={n:>6} d={measured:.3f}: ours {ours_ms:8.3f} ms ({row['ours_tflops']:.0f} TF/s)  flex {flex_ms:8.3f}"
                f"  cudnn {sdpa['cudnn']:8.3f} ({row['cudnn_tflops']:.0f})  flash {sdpa['flash']:8.3f}  portable "
                f"{portable_ms:8.3f}  [{config}]"
            )
            del plan, mask, out, flex_out, portable_out
        del q, k, v, reference_out
        torch.cuda.empty_cache()
    bar.close()
    return rows


def per_tile_launch(q, k, v, plan) -> torch.Tensor:
    """The Hopper kernel with one CTA per query tile instead of its persistent grid, for the side column."""
    out = torch.empty_like(q)
    shape = CallShape(q.shape[0], q.shape[1], q.shape[2], q.shape[3], k.shape[1], k.shape[2])
    launch_hopper(hopper_args(q, k, v, out, out, plan, shape, None, 0, None),
                  hopper_constants(q.dtype, plan, shape, None, True, False), q.device, persistent=False)
    return out


def host_time(args: argparse.Namespace, length: int = 8192, calls: int = 200) -> dict:
    """CPU microseconds per call through ``torch.ops.dam.sparse_attention`` (a 10% plan at ``length``): the CPU
    time of the calling thread over a loop of ``calls`` (``time.thread_time``), with fewer launches queued than
    the GPU's queue holds, so the CPU never waits for the GPU. The least of 9 loops: on the lent GPU machine (a
    VM) loops of one process, pinned to one core or not, ranged from 41 to 105 us, so the least is the call's
    cost and the rest is the neighbours'; every loop and the wall-clock median are kept beside it."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(1, args.heads, length, args.head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, args.kv_heads, length, args.head_dim, device="cuda", dtype=torch.bfloat16)
    plan = random_plan(length, length, args.block_size, 0.1, args.heads, True, "cuda", gen)

    def call():
        return sparse_attention(q, k, k, plan, is_causal=True, enable_gqa=True)

    for _ in range(20):
        call()
    cpu, wall = [], []
    for _ in range(9):
        torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.thread_time()
        for _ in range(calls):
            call()
        cpu.append((time.thread_time() - start_cpu) / calls * 1e6)
        wall.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    gpu_ms = bench_ms(call)
    log(f"host time at {length}: {min(cpu):.1f} us CPU per call (loops' median {median(cpu):.1f}; wall "
        f"{median(wall):.1f} us; GPU {gpu_ms * 1e3:.0f} us)")
    return {"seq_len": length, "density": 0.1, "host_us": min(cpu), "host_us_median": median(cpu),
            "host_us_loops": cpu, "host_wall_us": median(wall), "gpu_us": gpu_ms * 1e3}


def copy_bandwidth_gbs(bytes_: int = 2**30) -> float:
    """This GPU's device-to-device copy bandwidth, GB/s, counting the bytes read and written."""
    src = torch.empty(bytes_, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * bytes_ / ms / 1e6


def decode_plan_per_kv_head(kv_len: int, block: int, density: float, heads: int, kv_heads: int, gen,
                            window: int = 0):
    """``(counts [1, H, 1], indices [1, H, 1, K], kept blocks per KV head)``: one random set of blocks per KV
    head (with the first and the last ``max(1, window)`` blocks: a DAM plan's sink and local window), shared by
    the query heads of its group, so the bytes the kernel must read are exactly KVH x kept x block x D x 2
    tensors."""
    nk = -(-kv_len // block)
    keep = max(2, round(density * nk))
    scores = torch.rand(kv_heads, nk, device="cuda", generator=gen)
    scores[:, 0] = scores[:, -max(1, window):] = 2.0
    chosen = scores.topk(keep, dim=-1).indices.sort(-1).values.to(torch.int32)
    indices = chosen.repeat_interleave(heads // kv_heads, dim=0)[None, :, None, :].contiguous()
    counts = torch.full((1, heads, 1), keep, dtype=torch.int32, device="cuda")
    return counts, indices, keep


# Decode plans: random blocks per KV head at each density, and at 10% a sink and a local window of 32 blocks
# (4K keys) beside the random ones, as DAM's diagonal patterns keep.
DECODE_PLANS = tuple(("random", density, 0) for density in DECODE_DENSITIES) + (("sink+window+random", 0.1, 32),)


def item_cost(args: argparse.Namespace, n: int = 32768) -> dict:
    """What a work item (query tile x head) costs apart from its key blocks, ours and FlexAttention on the same
    plans. Every query-block row keeps exactly ``k`` blocks (:func:`fixed_count_plan`, ``k`` in
    :data:`ITEM_BLOCKS`; the first rows, with fewer visible, keep all), so the items stay the same while the kept
    blocks grow; a least-squares line ``time = c + s * blocks`` per kernel gives SM-microseconds per kept block
    (``s x SMs``) and per item (``c x SMs / items``). At 3% of 32K a row keeps about four blocks, so the
    per-item cost is what the low-density rows pay beyond their blocks."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    h, kvh, d, block = args.heads, args.kv_heads, args.head_dim, args.block_size
    q = torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, kvh, n, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, kvh, n, d, device="cuda", dtype=torch.bfloat16)
    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    for per_row in ITEM_BLOCKS:
        plan = fixed_count_plan(n, n, block, per_row, h, True, "cuda", gen)
        mask = flex_block_mask(plan, n, h)

        def ours():
            return triton_block_sparse_attention(q, k, v, plan, is_causal=True, enable_gqa=True, check_plan=False)

        def theirs():
            return flex(q, k, v, block_mask=mask, enable_gqa=True)

        row = {"seq_len": n, "blocks_per_row": per_row, "items": h * plan.kv_num_blocks.shape[2],
               "kept_blocks": plan.kept_blocks().sum().item(), "rel_err_vs_flex": rel_err(ours(), theirs()),
               "ours_ms": bench_ms(ours), "flex_ms": bench_ms(theirs)}
        rows.append(row)
        log(f"items: N={n} {per_row} blocks per row: ours {row['ours_ms']:.3f} ms, flex {row['flex_ms']:.3f} ms")
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    fit = {name: item_fit(rows, name, sms) for name in ("ours", "flex")}
    log("items: SM-us per item / per kept block: " + ", ".join(
        f"{name} {f['per_item_sm_us']:.2f} / {f['per_block_sm_us']:.2f}" for name, f in fit.items()))
    return {"rows": rows, "sms": sms, "fit": fit}


def item_fit(rows: list[dict], name: str, sms: int) -> dict:
    """SM-microseconds per work item and per kept block of the times ``rows[i][name + "_ms"]``: the least-squares
    line of time over kept blocks (the rows share one item count)."""
    blocks = torch.tensor([r["kept_blocks"] for r in rows], dtype=torch.float64)
    us = torch.tensor([r[f"{name}_ms"] for r in rows], dtype=torch.float64) * 1e3
    fixed, per_block = torch.linalg.lstsq(torch.stack([torch.ones_like(blocks), blocks], 1), us[:, None]).solution[:, 0]
    return {"per_item_sm_us": fixed.item() * sms / rows[0]["items"], "per_block_sm_us": per_block.item() * sms}


def decode_rows(args: argparse.Namespace) -> list[dict]:
    """The decode kernel over kept blocks, against the copy bandwidth; dense decode through SDPA for scale.
    Kernel times replay a CUDA graph (:func:`graph_ms`: what a decode step costs the GPU, without the host's
    launch time, which the host part measures), beside the earlier flush's (``*_dirty_l2_ms``), the eager
    time (``do_bench``) and the read ceiling (``read_ceiling_ms``: a kernel on the same grid that only reads the
    kept blocks, :mod:`read_ceiling`)."""
    gen = torch.Generator(device="cuda").manual_seed(2)
    h, kvh, d, block = args.heads, args.kv_heads, args.head_dim, args.block_size
    copy_gbs = copy_bandwidth_gbs()
    log(f"copy bandwidth {copy_gbs:.0f} GB/s")

    def of_copy(bytes_: int, ms: float) -> float:
        """Bytes moved in ``ms`` as a fraction of the copy bandwidth."""
        return bytes_ / ms / 1e6 / copy_gbs

    rows = []
    for kv_len in args.decode_kv:
        q = torch.randn(1, h, 1, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, kvh, kv_len, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            dense = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
            sdpa_ms, sdpa_dirty_ms = graph_ms(dense, (q,)), graph_ms(dense, (q,), dirty_flush=True)
        dense_fraction = of_copy(kvh * kv_len * d * 2 * k.element_size(), sdpa_ms)
        for plan, density, window in DECODE_PLANS:
            counts, indices, keep = decode_plan_per_kv_head(kv_len, block, density, h, kvh, gen, window)
            decode = lambda: triton_sparse_decode(q, k, v, counts, indices, block, enable_gqa=True)  # noqa: E731
            ms, eager_ms = graph_ms(decode, (q, counts, indices)), bench_ms(decode)
            dirty_ms = graph_ms(decode, (q, counts, indices), dirty_flush=True)
            reader = KeptBlockReader(k, v, indices[0, ::h // kvh, 0], block)
            ceiling_ms = graph_ms(reader, (q, reader.table, reader.counts))
            kept_bytes = kvh * min(keep * block, kv_len) * d * 2 * k.element_size()
            row = {"kv_len": kv_len, "plan": plan, "density": keep / -(-kv_len // block), "ours_ms": ms,
                   "ours_dirty_l2_ms": dirty_ms, "ours_eager_ms": eager_ms, "kept_kv_bytes": kept_bytes,
                   "achieved_gbs": kept_bytes / ms / 1e6, "copy_gbs": copy_gbs,
                   "bw_fraction": of_copy(kept_bytes, ms), "bw_fraction_dirty_l2": of_copy(kept_bytes, dirty_ms),
                   "read_ceiling_ms": ceiling_ms, "read_ceiling_fraction": of_copy(kept_bytes, ceiling_ms),
                   "sdpa_flash_dense_ms": sdpa_ms,
                   "sdpa_flash_dense_dirty_l2_ms": sdpa_dirty_ms, "sdpa_dense_bw_fraction": dense_fraction}
            rows.append(row)
            log(f"decode KV={kv_len} {plan} d={row['density']:.3f}: {ms * 1e3:.1f} us ({dirty_ms * 1e3:.1f} dirty L2, "
                f"{eager_ms * 1e3:.1f} eager), {row['achieved_gbs']:.0f} GB/s ({row['bw_fraction']:.2f} of copy; "
                f"reading alone {ceiling_ms * 1e3:.1f} us, {row['read_ceiling_fraction']:.2f}); "
                f"flash SDPA dense {sdpa_ms * 1e3:.1f} us ({sdpa_dirty_ms * 1e3:.1f} dirty L2)")
        del q, k, v
        torch.cuda.empty_cache()
    return rows


_SPIN_CYCLES = 400_000  # about 200 us of GPU clock: longer than the host takes to queue a replay on a busy VM


def graph_ms(fn, inputs: tuple[Tensor, ...] = (), replays: int = 100, dirty_flush: bool = False) -> float:
    """Median milliseconds of one replay of ``fn`` captured in a CUDA graph, as in a decode step: before each
    replay (outside the timed span) L2 is flushed by reading a 256 MB buffer, so the kept K/V blocks come from
    HBM, and then ``inputs`` are read back into it, as the step's earlier ops (the query projection, the plan)
    have just written them; a spin kernel then keeps the GPU busy until the replay is queued (else a slow host
    adds its gap to the timed span). ``dirty_flush`` flushes by writing the buffer instead (the earlier
    method): L2 then holds 50+ MB of dirty lines that the timed kernel pays to write back, which no decode step
    does."""
    stream = torch.cuda.Stream()  # warm up (compile) on a side stream, as CUDA-graph capture asks
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    sink = torch.empty((), dtype=torch.float32, device="cuda")
    times = []
    for _ in range(replays):
        if dirty_flush:
            flush.zero_()
        else:
            torch.sum(flush.view(torch.float32), 0, out=sink)
        for t in inputs:
            t.sum(dtype=torch.float32)
        torch.cuda._sleep(_SPIN_CYCLES)  # the GPU stays busy while the host queues the timed span: no idle gap in it
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return median(times)


def summarize(rows: list[dict], host: dict | None = None, decode: list[dict] | None = None) -> dict:
    """The headline fields of shared/RESULTS.md (kernel section), from this run (null with a reason when not
    measured). "d" is each row's measured density."""
    notes = {}

    def row(n, dens):
        return next((r for r in rows if r["seq_len"] == n and r["density_nominal"] == dens), None)

    summary = {}
    for n, name in ((32768, "dense_vs_cudnn_32k"), (131072, "dense_vs_cudnn_128k")):
        r = row(n, 1.0)
        summary[name] = None if r is None else round(r["ours_tflops"] / r["cudnn_tflops"], 3)
        if r is None:
            notes[name] = f"N={n} at density 1.0 was not run"
    sparse = {n: [row(n, dens) for dens in SPARSE_DENSITIES] for n in (32768, 131072)}
    for n, name in ((131072, "sparse_vs_cudnn_128k"), (32768, "sparse_vs_cudnn_32k")):
        if all(sparse[n]):
            summary[name] = round(max(r["ours_ms"] / (r["density"] * r["cudnn_ms"]) for r in sparse[n]), 3)
        else:
            summary[name] = None
            notes[name] = f"N={n} at densities {SPARSE_DENSITIES} not all run"
    against_flex = sparse[32768] + sparse[131072]
    summary["vs_flex_min"] = round(min(r["speedup_vs_flex"] for r in against_flex), 3) if all(against_flex) else None
    if summary["vs_flex_min"] is None:
        notes["vs_flex_min"] = "N=32K and 128K at every sparse density not all run"
    summary["host_us_8k"] = None if host is None else round(host["host_us"], 1)
    if host is None:
        notes["host_us_8k"] = "the host part was not run"
    at_128k = [r for r in decode or []
               if r["kv_len"] == 131072 and r["density"] < 1.0 and r.get("plan", "random") == "random"]
    summary["decode_bw_fraction_128k"] = round(max(r["bw_fraction"] for r in at_128k), 3) if at_128k else None
    if at_128k:
        best = max(at_128k, key=lambda r: r["bw_fraction"])
        notes["decode_bw_fraction_128k"] = (f"random kept blocks per KV head at density {best['density']:.3f}"
                                            " of a 128K cache" + (f"; a kernel on the same grid that only reads them: "
                                                                  f"{best['read_ceiling_fraction']:.3f}"
                                                                  if "read_ceiling_fraction" in best else ""))
    else:
        notes["decode_bw_fraction_128k"] = "the decode part did not run at 128K KV"
    if all(r is not None and r["time_over_density_x_dense"] is not None for r in sparse[131072]):
        summary["sparse_efficiency_128k"] = round(max(r["time_over_density_x_dense"] for r in sparse[131072]), 3)
        summary["vs_flex_128k"] = round(min(r["speedup_vs_flex"] for r in sparse[131072]), 3)
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
