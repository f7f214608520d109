"""What the fused block-sparse kernels (the portable Triton one and the Hopper path) cost the GPU per CTA, compiled for Hopper (sm_90) on any machine, a GPU
or none: registers per thread, spilled bytes, shared memory, and how many CTAs of it fit one SM.

    python benchmarks/kernel_resources.py                 # the variant matrix, with the installed Triton
    python benchmarks/kernel_resources.py --quick         # three variants and the Hopper path (the CPU test)

Without a GPU, Triton's CUDA driver is replaced by one that only reports an sm_90 device, so ``warmup`` runs the
real compiler (TTIR -> PTX -> cubin with the bundled ptxas) and launches nothing. The arguments come from the
launcher's own ``kernel_args`` / ``kernel_constants``, so what compiles here is what a launch would compile.
Occupancy and spills explain the kernel table's timings; they are not timings.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("kernel_resources compiles for the GPU: unset TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402

from dam_compile.kernels.block_sparse_launch import KernelConfig
from bench_plans import random_plan  # noqa: E402
from dam_compile.kernels import block_sparse_launch as launch  # noqa: E402
from dam_compile.kernels.block_sparse_kernel import block_sparse_attention_fwd  # noqa: E402

# Hopper's per-SM limits (H100 and H200 alike): registers, shared memory for one block and for the SM.
REGISTERS_PER_SM = 65536
MAX_SHARED_PER_BLOCK = 232448
SHARED_PER_SM = 233472
MAX_WARPS_PER_SM = 64


class Variant(NamedTuple):
    """One compiled kernel: the call's shape and features, and the tile config."""

    name: str
    head_dim: int
    seq_len: int
    plan_block: int
    config: KernelConfig
    tma: bool = False
    causal: bool = True
    mask: str | None = None  # "bool" or "float"
    pattern: bool = False  # DAM's token pattern (diagonals, columns and the PCL corner)
    lse: bool = False
    kv_range: bool = False


VARIANTS = [
    Variant("dense path, TMA, D128 (Hopper default)", 128, 8192, 128, KernelConfig(128, 128, 8, 3), tma=True),
    Variant("pointer loads, D128", 128, 8192, 128, KernelConfig(128, 128, 8, 3)),
    Variant("128x64 tiles, D128", 128, 8192, 128, KernelConfig(128, 64, 8, 3), tma=True),
    Variant("64x64 tiles, D128", 128, 8192, 128, KernelConfig(64, 64, 4, 3), tma=True),
    Variant("ragged N, token pattern, LSE, kv_range, D64", 64, 2000, 64, KernelConfig(64, 64, 4, 3), pattern=True,
            lse=True, kv_range=True),
    Variant("bool mask, D128", 128, 4096, 128, KernelConfig(128, 64, 8, 3), mask="bool"),
    Variant("float mask, not causal, D96", 96, 4096, 64, KernelConfig(64, 64, 4, 2), causal=False, mask="float"),
    Variant("D256", 256, 4096, 128, KernelConfig(64, 64, 4, 2)),
]
QUICK = [VARIANTS[0], VARIANTS[4], VARIANTS[6]]
# The Hopper path (Gluon, warp-specialised): head dims it takes, each with LSE and kv_range on.
HOPPER_HEAD_DIMS = (128, 64)
# Its launch: 4 consumer warps (the kernel's num_warps) + 4 more consumers + 1 loader warp, which the register
# file allocates as a third warpgroup.
HOPPER_WARPS = 12


def fake_hopper_driver():
    """A CUDA driver that reports an sm_90 device and stream 0 and can launch nothing."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver

    class FakeHopper(CudaDriver):
        def __init__(self):  # no CUDA library to load
            pass

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_device_interface(self):
            return torch.cuda

        @staticmethod
        def is_active():
            return True

    return FakeHopper()


def compile_variant(v: Variant):
    """The ``CompiledKernel`` of ``v`` for the active driver's GPU (B=1, H=4, KVH=2, bf16, a random plan)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, v.seq_len, v.head_dim, dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, 2, v.seq_len, v.head_dim, dtype=torch.bfloat16, generator=g)
    plan = random_plan(v.seq_len, v.seq_len, v.plan_block, 0.3, 4, is_causal=v.causal, generator=g)
    if v.pattern:
        plan = plan.with_token_pattern(torch.tensor([[0, 5, 64]] * 4, dtype=torch.int32),
                                       torch.tensor([[0, 3]] * 4, dtype=torch.int32),
                                       torch.ones(4, 32, 32, dtype=torch.bool))
    mask = {None: None, "bool": torch.ones(1, 1, v.seq_len, v.seq_len, dtype=torch.bool),
            "float": torch.zeros(1, 1, v.seq_len, v.seq_len, dtype=torch.bfloat16)}[v.mask]
    kv_range = torch.tensor([[0, v.seq_len]], dtype=torch.int32) if v.kv_range else None
    shape = launch.CallShape(1, 4, v.seq_len, v.head_dim, 2, v.seq_len)
    out, lse = torch.empty_like(q), torch.empty(1, 4, v.seq_len)
    args = launch.kernel_args(q, k, k, out, lse, plan, shape, mask, kv_range, 0, None, v.tma)
    constants = launch.kernel_constants(q.dtype, plan, shape, mask, kv_range, v.causal, v.lse, v.tma)
    launch.set_tma_block_shapes({**args, **constants, "BLOCK_N": v.config.block_n})
    return block_sparse_attention_fwd.warmup(
        **args, **constants, BLOCK_M=v.config.block_m, BLOCK_N=v.config.block_n, num_warps=v.config.num_warps,
        num_stages=v.config.num_stages, grid=(1,),
    )


def compile_hopper(head_dim: int):
    """The ``CompiledKernel`` of the Hopper path for a bf16 causal call with LSE and kv_range (B=1, H=4, KVH=2,
    N=4096, a random plan of 128-key blocks), from its launcher's own arguments."""
    from dam_compile.kernels import hopper_launch

    g = torch.Generator().manual_seed(0)
    n = 4096
    q = torch.randn(1, 4, n, head_dim, dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, 2, n, head_dim, dtype=torch.bfloat16, generator=g)
    plan = random_plan(n, n, 128, 0.3, 4, is_causal=True, generator=g)
    shape = launch.CallShape(1, 4, n, head_dim, 2, n)
    kv_range = torch.tensor([[0, n]], dtype=torch.int32)
    args = hopper_launch.hopper_args(q, k, k, torch.empty_like(q), torch.empty(1, 4, n), plan, shape, kv_range, 0,
                                     None)
    constants = hopper_launch.hopper_constants(q.dtype, plan, shape, kv_range, True, True)
    return hopper_launch.hopper_block_sparse_fwd.warmup(**args, **constants, grid=(1,))


def compile_row_lse(shard: bool) -> tuple:
    """``(CompiledKernel, its launch constants)`` of the plan's row-LSE kernel (``kernels/last_rows_lse.py``)
    for the default estimator's sampled rows (SmolLM2's heads: 9 query / 3 KV, D64, 4K tokens, bf16), of a
    whole sequence or of a context-parallel shard (``block_map``), from its launcher's own arguments."""
    from dam_compile.kernels import last_rows_lse

    q = torch.randn(1, 9, 4096, 64, dtype=torch.bfloat16)
    k = torch.randn(1, 3, 4096 * (2 if shard else 1), 64, dtype=torch.bfloat16)
    blocks = torch.arange(32) * (2 if shard else 1) if shard else None
    launch = last_rows_lse.lse_launch(q, k, 128, True, 0.125, 32 * 16, 16, blocks)
    kernel = launch.kernel.warmup(*launch.args, **launch.constants, grid=(1,))
    return kernel, launch.constants


def resources(kernel, num_warps: int) -> dict:
    """Registers, spills (local-memory stack bytes), shared memory and CTAs per SM, read off the cubin."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{usage}")
    registers, stack, static_shared = (int(x) for x in found.groups())
    shared = kernel.metadata.shared + static_shared
    threads = 32 * num_warps
    fit = min(REGISTERS_PER_SM // (registers * threads), SHARED_PER_SM // max(shared, 1),
              MAX_WARPS_PER_SM // num_warps)
    return dict(registers=registers, spill_bytes=stack, shared_bytes=shared, ctas_per_sm=fit,
                fits_one_block=shared <= MAX_SHARED_PER_BLOCK)


def measure(variants: list[Variant], quick: bool = False) -> list[dict]:
    """Compile ``variants`` for the GPU here, or, without one, for an sm_90 that the fake driver reports (this
    process keeps that driver: the script is a process of its own)."""
    if not torch.cuda.is_available():
        from triton.runtime import driver

        driver.set_active(fake_hopper_driver())
    rows = [dict(variant=v.name, config=v.config._asdict(), **resources(compile_variant(v), v.config.num_warps))
            for v in variants]
    hopper = [dict(variant=f"Hopper path (Gluon, warp-specialised), D{d}, LSE, kv_range",
                   config=dict(block_m=128, block_n=128, num_warps=HOPPER_WARPS, num_stages=2),
                   **resources(compile_hopper(d), HOPPER_WARPS))
              for d in HOPPER_HEAD_DIMS[:1 if quick else None]]
    row_lse = []
    for shard in (False, True):
        kernel, c = compile_row_lse(shard)
        row_lse.append(dict(variant=f"row-LSE kernel (the plan's sampled rows{', a shard' if shard else ''}), D64",
                            config=dict(block_m=c["BLOCK_M"], block_n=c["BLOCK_N"], num_warps=c["num_warps"],
                                        num_stages=c["num_stages"]),
                            **resources(kernel, c["num_warps"])))
    return rows + hopper + row_lse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="three variants only")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    rows = measure(QUICK if args.quick else VARIANTS, args.quick)
    if args.json:
        target = torch.cuda.get_device_name() if torch.cuda.is_available() else "sm_90 (no GPU: compiled only)"
        print(json.dumps(dict(triton=triton.__version__, target=target, rows=rows)))
        return
    print(f"Triton {triton.__version__}, {torch.cuda.get_device_name() if torch.cuda.is_available() else 'sm_90'}")
    print("| variant | BLOCK_M x BLOCK_N, warps, stages | registers | spill bytes | shared KB | CTAs / SM |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        c = r["config"]
        print(f"| {r['variant']} | {c['block_m']}x{c['block_n']}, {c['num_warps']}, {c['num_stages']} | "
              f"{r['registers']} | {r['spill_bytes']} | {r['shared_bytes'] / 1024:.1f} | {r['ctas_per_sm']} |")


if __name__ == "__main__":
    main()
