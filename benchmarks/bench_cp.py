"""Context-parallel prefill: our ring (``dam_compile.context_parallel``) against the dense ring (PyTorch's
``context_parallel`` with its own SDPA steps) on the same sharded prompt, per length, on every rank of a
``torchrun`` job.

    torchrun --nproc-per-node 2 benchmarks/bench_cp.py                 # 8B shape, 2 layers, 128K-1M, bf16
    torchrun --nproc-per-node 2 benchmarks/bench_cp.py --smoke         # CPU, gloo, a tiny Llama: the flow only
    torchrun --nproc-per-node 2 benchmarks/bench_cp.py --options '{"density": 0.1}'

The model is the Llama-3.1-8B shape with ``--layers`` decoder layers and random weights (every rank the same
seed), run eagerly (under ``context_parallel`` the attention runs between compiled graphs anyway), prompt and
position ids sharded by ``context_parallel`` with its head-tail load balancing. Per (variant, length): the median
prefill time (rank 0's clock: the ranks meet at every ring step), the busiest rank's peak memory; per length the
time one layer's key/value all-gather takes alone (what the ring transfers for one attention call) against our
per-layer time; first, the dense-source check (our ring with every block vs one process, at ``--check-length``).

Random weights attend almost uniformly, so the default options (budgets that follow the mass, no cap) keep
almost every block here: ``--options`` sets what the rows measure (a cap such as a real model's density),
and the file says which. On the CPU (``--smoke``) PyTorch's ring has no SDPA step (its handlers cover CUDA
kernels), so the dense ring there is ours with the dense source, marked as such.

Rank 0 rewrites ``results/cp_<gpu>.json`` (the ``summary`` of ``../shared/RESULTS.md``, cp section) after each
phase, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from bench_common import RESULTS, int_list, run_metadata, write_result
from bench_e2e import HEADLINE_MODEL, K, release_memory, repeats_for
from bench_tp import Clock, busiest, joined, log, prompt

import dam_compile
from dam_compile.cli.model_specs import build_from_config, hf_config

LENGTHS = (128 * K, 256 * K, 512 * K, 1024 * K)
SMOKE = dict(lengths="128,256", check_length=128, layers=2)
SMOKE_OPTIONS = dict(kernel="reference", min_seq_len=0, block_size=16, density=0.3)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=HEADLINE_MODEL)
    p.add_argument("--layers", type=int, default=2, help="decoder layers (attention dominates at these lengths)")
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    p.add_argument("--check-length", type=int, default=32 * K, help="length of the dense-source check")
    p.add_argument("--options", default="{}", help="DAMConfig options of our ring, as JSON")
    p.add_argument("--smoke", action="store_true", help="CPU, gloo, a tiny Llama, the reference kernel")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.smoke:
        args.lengths, args.check_length, args.layers = SMOKE["lengths"], SMOKE["check_length"], SMOKE["layers"]
    return args


def build(args: argparse.Namespace, device: str):
    config = hf_config(args.model, layers=args.layers, max_positions=max(int_list(args.lengths)) + 4096)
    if args.smoke:
        config.hidden_size, config.intermediate_size, config.num_attention_heads = 64, 96, 4
        config.num_key_value_heads, config.head_dim, config.vocab_size = 2, 16, 96
    return build_from_config(config, device=device, dtype=torch.float32 if args.smoke else torch.bfloat16, seed=0)


def ring(variant: str, mesh, buffers: list[torch.Tensor], model, options: dict, device: str):
    """The context manager of ``variant``: ``dam`` (ours, ``options``), ``dam-dense`` (ours, every block) or
    ``dense-ring`` (PyTorch's own ring; ours with the dense source on the CPU, where PyTorch has none)."""
    from torch.distributed.tensor.experimental import context_parallel

    if variant == "dense-ring" and device == "cuda":
        return context_parallel(mesh, buffers=buffers, buffer_seq_dims=[1] * len(buffers))
    chosen = dict(options, mask_source="dense") if variant != "dam" else options
    return dam_compile.context_parallel(mesh, buffers=buffers, buffer_seq_dims=[1] * len(buffers), model=model,
                                        options=chosen)


def forward(model, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The prefill's last hidden states (no logits: the vocabulary head of a 1M-token shard alone is gigabytes)."""
    return model.model(input_ids=ids, position_ids=positions).last_hidden_state


def prefill_rows(model, mesh, args: argparse.Namespace, options: dict, clock: Clock, device: str) -> list[dict]:
    rows = []
    for length in int_list(args.lengths):
        for variant in ("dense-ring", "dam"):
            row = dict(variant=variant, length=length, layers=args.layers)
            ids = prompt(model.config.vocab_size, length, device)
            positions = torch.arange(length, device=device)[None]
            try:
                with torch.no_grad(), ring(variant, mesh, [ids, positions], model, options, device) as mode:
                    clock.reset_peak()
                    warmup, repeats = repeats_for(length)
                    row["ms"] = clock.ms(lambda: forward(model, ids, positions), warmup, repeats)
                    row["peak_mem_gb"] = busiest(clock.peak_gb())
                    if mode is not None and hasattr(mode, "steps"):
                        row["ring_steps"] = dict(mode.steps)
            except torch.OutOfMemoryError as exc:
                row["error"] = f"OutOfMemoryError: {str(exc).splitlines()[0][:200]}"
            log(f"prefill {variant} {length}: {row.get('ms', row.get('error'))}")
            rows.append(row)
            release_memory()
        rows[-1]["kv_allgather_ms"] = kv_allgather_ms(model, length, mesh, clock, device)
    return rows


def kv_allgather_ms(model, length: int, mesh, clock: Clock, device: str) -> float:
    """One all-gather of a layer's key/value shards (what PyTorch's default rotater moves per attention call)."""
    config = model.config
    world = mesh.size()
    shard = torch.empty(2 * config.num_key_value_heads * (length // world) * config.head_dim,
                        dtype=next(model.parameters()).dtype, device=device)
    out = torch.empty(world * shard.numel(), dtype=shard.dtype, device=device)
    return clock.ms(lambda: dist.all_gather_into_tensor(out, shard, group=mesh.get_group()), 1, 3)


def dense_check(model, mesh, args: argparse.Namespace, options: dict, device: str) -> dict:
    """Our ring with every block against one process, at ``--check-length``: the largest relative error of any
    rank's hidden states."""
    length = args.check_length
    ids = prompt(model.config.vocab_size, length, device)
    positions = torch.arange(length, device=device)[None]
    with torch.no_grad():
        single = forward(model, ids, positions)
        with ring("dam-dense", mesh, [ids, positions], model, options, device):
            ours = forward(model, ids, positions)
            mine = positions[0].clone()
    error = float((ours[0].float() - single[0, mine].float()).norm() / single[0, mine].float().norm())
    return dict(length=length, max_rel_err=busiest(error))


def summarize(prefill: list[dict], check: dict, options: dict) -> dict:
    """The cp headline (``../shared/RESULTS.md``); ``None`` with a reason where not measured."""
    def row(variant: str, length: int) -> dict | None:
        return next((r for r in prefill if r["variant"] == variant and r["length"] == length and "ms" in r), None)

    summary = {"cp_max_rel_err_dense": check.get("max_rel_err")}
    notes = {"cp_max_rel_err_dense": f"our ring, every block, vs one process at {check['length']} tokens (hidden "
                                     "states)" if check else "the check did not run"}
    ours, dense = row("dam", 512 * K), row("dense-ring", 512 * K)
    summary["cp_speedup_vs_dense_ring_512k"] = dense["ms"] / ours["ms"] if ours and dense else None
    notes["cp_speedup_vs_dense_ring_512k"] = (f"options {json.dumps(options)}" if ours and dense
                                              else "no prefill of both rings at 524288")
    transfer = next((r["kv_allgather_ms"] for r in prefill if r["length"] == 512 * K and "kv_allgather_ms" in r), None)
    summary["cp_comm_fraction_512k"] = (transfer * ours["layers"] / ours["ms"]) if ours and transfer else None
    notes["cp_comm_fraction_512k"] = ("the key/value all-gather of every layer timed alone, over our prefill time "
                                      "(an upper bound: the ring overlaps it with its first step)"
                                      if summary["cp_comm_fraction_512k"] is not None else "not measured at 524288")
    ran = [r["length"] for r in prefill if r["variant"] == "dam" and "ms" in r]
    summary["cp_max_tokens_2gpu"] = max(ran) if ran and dist.get_world_size() == 2 else None
    notes["cp_max_tokens_2gpu"] = (f"the longest length of --lengths that ran on {dist.get_world_size()} ranks"
                                   if summary["cp_max_tokens_2gpu"] is not None else "not a two-rank run")
    summary["notes"] = notes
    return summary


def main(argv=None) -> None:
    args = parse_args(argv)
    with joined(args.smoke) as (device, mesh):
        measure(args, device, mesh)


def measure(args: argparse.Namespace, device: str, mesh) -> None:
    """The dense check, then every (length, ring), on this rank; rank 0 rewrites the file after each."""
    rank = dist.get_rank()
    import transformers

    options = dict(SMOKE_OPTIONS, **json.loads(args.options)) if args.smoke else json.loads(args.options)
    clock = Clock(device)
    result = run_metadata("cp")
    result.update(transformers=transformers.__version__,
                  config=dict(model=args.model, layers=args.layers, world=dist.get_world_size(), smoke=args.smoke,
                              dtype="float32" if args.smoke else "bfloat16", weights="random (from the released config)",
                              load_balance="context_parallel's head-tail", dam_options=options,
                              dense_ring="ours, dense source (PyTorch's ring has no CPU SDPA step)" if device == "cpu"
                              else "PyTorch's context_parallel with its SDPA steps"),
                  check={}, prefill=[])

    def save() -> None:
        if rank == 0:
            result["summary"] = summarize(result["prefill"], result["check"], options)
            write_result(result, "cp", quick=False, out=args.out or (RESULTS / "cp_smoke.json" if args.smoke else None))

    model = build(args, device)
    result["check"] = dense_check(model, mesh, args, options, device)
    log(f"dense check: {result['check']}")
    save()
    result["prefill"] = prefill_rows(model, mesh, args, options, clock, device)
    save()
    dist.barrier()


if __name__ == "__main__":
    main()
