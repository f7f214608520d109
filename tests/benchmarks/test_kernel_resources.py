"""The fused kernels (the portable one and the Gluon Hopper path) compile for Hopper (sm_90) with the installed
Triton, here without a GPU.

The CPU interpreter runs the kernel's arithmetic but not Triton's compiler, so code that interprets and does not
compile (a constexpr tuple unpacked into runtime values, say) passes every CPU kernel test and fails on the GPU.
``benchmarks/kernel_resources.py`` compiles the launcher's own arguments through the real compiler (TTIR -> PTX
-> cubin) against a driver that reports an sm_90 device; this test runs it in a process without
``TRITON_INTERPRET``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_resources.py"


@pytest.mark.slow
def test_the_fused_kernel_compiles_for_hopper_and_fits_an_sm():
    if not SCRIPT.exists():
        pytest.skip("not run from a source checkout")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json"], capture_output=True, text=True,
                         timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    names = [r["variant"] for r in report["rows"]]
    assert len(names) == 6 and any("TMA" in n for n in names) and any("token pattern" in n for n in names)
    for row in report["rows"]:
        assert 0 < row["registers"] <= 255, row
        assert row["fits_one_block"] and row["ctas_per_sm"] >= 1, row  # launchable on an H100 / H200
    # The warp-specialised Hopper path: its three partitions fit one SM's registers (168 x 12 warps) unspilled.
    hopper = [r for r in report["rows"] if r["variant"].startswith("Hopper path")]
    assert len(hopper) == 1 and hopper[0]["spill_bytes"] == 0 and hopper[0]["registers"] * 32 * 12 <= 65536
    # The plan's row-LSE kernel (the default estimator's sampled rows; a context-parallel shard's): unspilled.
    row_lse = [r for r in report["rows"] if r["variant"].startswith("row-LSE")]
    assert len(row_lse) == 2 and all(r["spill_bytes"] == 0 for r in row_lse)
