"""Tensor-parallel prefill and decode with ``backend="dam"``, against the same tensor-parallel model run by eager
HuggingFace (SDPA) and by inductor, and against one GPU in the same run.

    torchrun --nproc-per-node 2 benchmarks/bench_tp.py                  # Llama-3.1-8B shape, bf16, 2 GPUs
    torchrun --nproc-per-node 2 benchmarks/bench_tp.py --smoke          # CPU, gloo, a tiny Llama: the flow only

Every rank builds the model from its released config (random weights, one seed, so every rank and the one-GPU
copy hold the same weights) and shards it as HuggingFace's ``tp_plan="auto"`` does for Llama (q/k/v and
gate/up column-wise, o/down row-wise; ``parallelize_module``), then compiles it on every rank, with the
sequence dimension marked dynamic as ``bench_e2e`` does (one compile serves every length). Per case: the
median prefill time (rank 0's clock; the ranks meet in every all-reduce), the peak memory of the busiest rank,
and for decode the tokens/s over a static cache. Rank 0 then runs the unsharded model alone for the one-GPU
speedup. The dense-source equivalence check runs the first ``--check-layers`` layers of the same model (same
seed) sharded and alone: what it checks is per layer, and a short model compiles in seconds.

Phases run in the order prefill, check and one GPU, decode; rank 0 rewrites ``results/tp_<gpu>.json`` (with the
``summary`` of ``../shared/RESULTS.md``, tp section) after each, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import contextmanager
from pathlib import Path
from statistics import median
from typing import Any, Iterator

import torch
import torch.distributed as dist

from bench_common import RESULTS, filled_static_cache, run_metadata, write_result
from bench_e2e import HEADLINE_MODEL, K, release_memory, repeats_for
from e2e_paths import mark_dynamic

import dam_compile
from dam_compile.cli.model_specs import build_from_config, hf_config

# HuggingFace's tp_plan for Llama-family decoder layers (config.base_model_tp_plan), as parallelize_module styles.
TP_PLAN = {"self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
           "self_attn.o_proj": "rowwise", "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise",
           "mlp.down_proj": "rowwise"}
VARIANTS = ("eager", "inductor", "dam-dynamic")
SMOKE_OPTIONS = dict(kernel="reference", min_seq_len=0, block_size=16, inner_backend="aot_eager")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=HEADLINE_MODEL)
    p.add_argument("--lengths", default="32768,131072", help="prefill lengths")
    p.add_argument("--decode-kv", default="131072", help="decode KV lengths ('' for none)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="prefill variants, of " + ", ".join(VARIANTS))
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--check-length", type=int, default=8192, help="length of the dense-source equivalence check")
    p.add_argument("--check-layers", type=int, default=4, help="decoder layers of the equivalence check's model")
    p.add_argument("--smoke", action="store_true", help="CPU, gloo, a 2-layer Llama, the reference kernel")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.smoke:
        args.lengths, args.decode_kv, args.decode_steps, args.check_length, args.check_layers = "96", "128", 2, 64, 2
    return args


def shard(model: torch.nn.Module, mesh) -> torch.nn.Module:
    """``model`` with every decoder layer's projections sharded per :data:`TP_PLAN` (in place; returned)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    plan = {f"model.layers.{i}.{name}": styles[style]()
            for i in range(len(model.model.layers)) for name, style in TP_PLAN.items()}
    return parallelize_module(model, mesh, plan)


class Clock:
    """Times and peak memory on the run's device: CUDA events and allocator statistics, or the CPU's clock."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def ms(self, fn, warmup: int, repeats: int) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(1000 * (time.perf_counter() - start))
        return median(times)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_gb(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None


def log(message: str) -> None:
    """Rank 0's progress line, with the seconds since the run started (a GPU run is cut at a time limit)."""
    if dist.get_rank() == 0:
        print(f"[{time.perf_counter() - STARTED:7.1f} s] {message}", flush=True)


STARTED = time.perf_counter()


def build(args: argparse.Namespace, device: str, layers: int | None = None):
    config = hf_config(args.model, layers=2 if args.smoke else layers)
    if args.smoke:
        config.hidden_size, config.intermediate_size, config.num_attention_heads = 64, 96, 4
        config.num_key_value_heads, config.head_dim, config.vocab_size = 2, 16, 96
    dtype = torch.float32 if args.smoke else torch.bfloat16
    return build_from_config(config, device=device, dtype=dtype, seed=0)


def runner(model, variant: str, args: argparse.Namespace):
    """The prefill for ``variant`` (``use_cache=False``, last logits only)."""
    def forward(input_ids):
        return model(input_ids=input_ids, use_cache=False, logits_to_keep=1).logits

    if variant == "eager":
        return forward
    backend = {} if variant == "inductor" else dict(backend=dam_backend(variant, args))
    compiled = torch.compile(forward, **backend)
    return lambda ids: compiled(mark_dynamic(dict(input_ids=ids))["input_ids"])


def dam_backend(variant: str, args: argparse.Namespace):
    """The ``dam`` backend for ``dam-<source>`` (the defaults but the source; the smoke's CPU options)."""
    source = variant.removeprefix("dam-")
    return dam_compile.backend(**(dict(SMOKE_OPTIONS, mask_source=source) if args.smoke else dict(mask_source=source)))


def prompt(vocab: int, length: int, device: str) -> torch.Tensor:
    return torch.randint(1, vocab, (1, length), generator=torch.Generator().manual_seed(length)).to(device)


def busiest(value: float | None) -> float | None:
    """The largest of every rank's ``value`` (peak memory: the rank that needs most)."""
    if value is None:
        return None
    got = torch.tensor([value], dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(got, op=dist.ReduceOp.MAX)
    return float(got)


def prefill_rows(model, args: argparse.Namespace, clock: Clock, device: str, tp: int) -> list[dict]:
    rows = []
    for variant in [v for v in args.variants.split(",") if v]:
        torch._dynamo.reset()
        run = runner(model, variant, args)
        for length in [int(n) for n in args.lengths.split(",") if n]:
            row = dict(model=args.model, tp=tp, variant=variant, length=length)
            ids = prompt(model.config.vocab_size, length, device)
            try:
                with torch.no_grad():
                    start = time.perf_counter()
                    run(ids)
                    clock.sync()
                    row["first_call_s"] = time.perf_counter() - start
                    clock.reset_peak()
                    warmup, repeats = repeats_for(length)
                    row["ms"] = clock.ms(lambda: run(ids), warmup, repeats)
                    row["peak_mem_gb"] = busiest(clock.peak_gb())
            except torch.OutOfMemoryError as exc:  # inductor's explicit-mask path at 128K, as on one GPU
                row["error"] = f"OutOfMemoryError: {str(exc).splitlines()[0][:200]}"
            if variant.startswith("dam"):
                row["paths"] = dam_compile.runtime_stats()
                dam_compile.reset_runtime_stats()
            log(f"prefill {variant} {length}: {row.get('ms', row.get('error'))} ms")
            rows.append(row)
            release_memory()
    return rows


def decode_rows(model, args: argparse.Namespace, clock: Clock, device: str, tp: int) -> list[dict]:
    """Decode steps over a static cache filled with random keys and values up to each length."""
    rows = []
    for variant in ("inductor", "dam-dynamic"):
        for kv_len in [int(n) for n in args.decode_kv.split(",") if n]:
            torch._dynamo.reset()
            row = dict(model=args.model, tp=tp, variant=variant, kv_len=kv_len, steps=args.decode_steps)
            backend = dict(backend=dam_backend(variant, args)) if variant.startswith("dam") else {}
            step = torch.compile(model.forward, mode="reduce-overhead" if device == "cuda" else None, **backend)
            cache, token = filled_static_cache(model, kv_len, args.decode_steps + 8, device)
            with torch.no_grad():
                positions = iter(range(kv_len, kv_len + args.decode_steps + 8))

                def one():
                    position = torch.tensor([next(positions)], device=device)
                    return step(token, past_key_values=cache, cache_position=position, position_ids=position[None],
                                use_cache=True).logits

                clock.reset_peak()
                row["ms_per_token"] = clock.ms(one, 3, args.decode_steps)
                row["tokens_per_s"] = 1000 / row["ms_per_token"]
                row["peak_mem_gb"] = busiest(clock.peak_gb())
            log(f"decode {variant} {kv_len}: {row['ms_per_token']:.2f} ms/token")
            rows.append(row)
            del cache
            release_memory()
    return rows


def dense_check_logits(args: argparse.Namespace, device: str, mesh=None) -> torch.Tensor:
    """The dense source's last logits at ``--check-length`` on the first ``--check-layers`` layers of the model,
    sharded over ``mesh`` (every rank must call it) or, without one, alone."""
    model = build(args, device, layers=args.check_layers)
    if mesh is not None:
        model = shard(model, mesh)
    torch._dynamo.reset()
    with torch.no_grad():
        logits = runner(model, "dam-dense", args)(prompt(model.config.vocab_size, args.check_length, device)).float()
    torch._dynamo.reset()
    del model
    release_memory()
    return logits


def one_gpu(args: argparse.Namespace, clock: Clock, device: str, tp_logits: torch.Tensor) -> dict:
    """Rank 0 alone: the unsharded model's prefill (eager and ours) at the longest length, and the check model's
    dense-source logits against ``tp_logits``, its tensor-parallel ones."""
    single = dense_check_logits(args, device)
    out = dict(dense_rel_err=float((tp_logits - single).norm() / single.norm()), check_layers=args.check_layers,
               check_length=args.check_length)
    log(f"dense-source check: relative error {out['dense_rel_err']:.2e}")
    model = build(args, device)
    longest = max(int(n) for n in args.lengths.split(",") if n)
    out["length"] = longest
    with torch.no_grad():
        for variant in ("eager", "dam-dynamic"):
            torch._dynamo.reset()
            run = runner(model, variant, args)
            ids = prompt(model.config.vocab_size, longest, device)
            run(ids)
            warmup, repeats = repeats_for(longest)
            out[f"{variant}_ms"] = clock.ms(lambda: run(ids), warmup, repeats)
            log(f"one GPU {variant} {longest}: {out[f'{variant}_ms']:.1f} ms")
    torch._dynamo.reset()
    del model
    release_memory()
    return out


def summarize(prefill: list[dict], single: dict) -> dict:
    """The tp headline (``../shared/RESULTS.md``); ``None`` with a reason where not measured (``single`` is
    empty before rank 0's one-GPU phase has run)."""
    def row(variant: str, length: int) -> dict | None:
        return next((r for r in prefill if r["variant"] == variant and r["length"] == length and "ms" in r), None)

    summary = {"tp_max_rel_err_dense": single.get("dense_rel_err")}
    notes = {"tp_max_rel_err_dense": (f"TP logits of the dense source vs one GPU's, same weights and prompt "
                                      f"({single['check_layers']} layers, {single['check_length']} tokens)"
                                      if single else "the one-GPU phase did not run")}
    longest = single.get("length")
    ours, dense = row("dam-dynamic", longest), [r for r in (row("eager", longest), row("inductor", longest)) if r]
    best = min(dense, key=lambda r: r["ms"]) if dense else None
    if ours and best:
        tp_speedup, one_speedup = best["ms"] / ours["ms"], single["eager_ms"] / single["dam-dynamic_ms"]
        summary["tp_speedup_retention_128k"] = tp_speedup / one_speedup
        notes["tp_speedup_retention_128k"] = (f"TP {tp_speedup:.2f}x over {best['variant']} / one GPU "
                                              f"{one_speedup:.2f}x over eager, at {longest}")
        summary["tp_peak_mem_ratio_128k"] = (ours["peak_mem_gb"] / best["peak_mem_gb"]
                                             if ours.get("peak_mem_gb") and best.get("peak_mem_gb") else None)
        notes["tp_peak_mem_ratio_128k"] = f"busiest rank, against {best['variant']}"
    else:
        summary["tp_speedup_retention_128k"] = summary["tp_peak_mem_ratio_128k"] = None
        missing = f"no prefill of ours, a dense baseline and one GPU at {longest}"
        notes["tp_speedup_retention_128k"] = notes["tp_peak_mem_ratio_128k"] = missing
    if longest is not None and longest != 128 * K:
        notes["length"] = f"the longest prefill measured is {longest}, not 131072"
    summary["notes"] = notes
    return summary


@contextmanager
def joined(smoke: bool) -> Iterator[tuple[str, Any]]:
    """Inside the ``torchrun`` job: gloo on the CPU (``smoke``, or no GPU), else NCCL with this process's GPU.
    Yields ``(device, a 1-D mesh of every rank)``; leaves the process group on the way out, error or not."""
    from torch.distributed.device_mesh import init_device_mesh

    device = "cpu" if smoke or not torch.cuda.is_available() else "cuda"
    dist.init_process_group("gloo" if device == "cpu" else "nccl")
    try:
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank())))
        yield device, init_device_mesh(device, (dist.get_world_size(),))
    finally:
        dist.destroy_process_group()


def main(argv=None) -> None:
    args = parse_args(argv)
    with joined(args.smoke) as (device, mesh):
        measure(args, device, mesh)


def measure(args: argparse.Namespace, device: str, mesh) -> None:
    """Every part on this rank, the file rewritten by rank 0 after each."""
    rank, tp = dist.get_rank(), dist.get_world_size()
    import transformers

    clock = Clock(device)
    result = run_metadata("tp")
    result.update(
        transformers=transformers.__version__,
        config=dict(model=args.model, tp=tp, dtype="float32" if args.smoke else "bfloat16",
                    weights="random (from the released config)", smoke=args.smoke,
                    sharding="parallelize_module: " + ", ".join(f"{k} {v}" for k, v in TP_PLAN.items()),
                    dam_options=dam_compile.DAMConfig().describe() if not args.smoke else SMOKE_OPTIONS),
        prefill=[], decode=[], one_gpu={},
    )

    def save() -> None:
        if rank == 0:
            result["summary"] = summarize(result["prefill"], result["one_gpu"])
            write_result(result, "tp", quick=False, out=args.out or (RESULTS / "tp_smoke.json" if args.smoke else None))

    model = shard(build(args, device), mesh)
    log("model built and sharded")
    result["prefill"] = prefill_rows(model, args, clock, device, tp)
    save()
    check = dense_check_logits(args, device, mesh)  # every rank; compared on rank 0
    dist.barrier()
    if rank == 0:
        result["one_gpu"] = one_gpu(args, clock, device, check)
    save()
    dist.barrier()
    result["decode"] = decode_rows(model, args, clock, device, tp)
    save()
    dist.barrier()


if __name__ == "__main__":
    main()
