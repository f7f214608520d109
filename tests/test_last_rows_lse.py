"""The last query block's per-key-block log-sum-exp (the adaptive estimator's exact mass): the Triton kernel
against its float64 PyTorch definition, over a shape matrix."""

import math

import pytest
import torch

from dam_compile.kernels.block_sparse_launch import interpreting
from dam_compile.kernels.last_rows_lse import (exact_query_rows, kernel_runs, last_rows_block_lse,
                                               last_rows_block_lse_reference)

DEVICES = (["cpu"] if interpreting() else []) + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "b, h, kvh, q_len, kv_len, d, block",
    [(1, 4, 2, 200, 200, 32, 32), (2, 4, 1, 70, 300, 64, 64), (1, 8, 2, 20, 20, 24, 16), (1, 2, 2, 300, 300, 128, 128)],
)
def test_kernel_matches_float64_definition(device, dtype, causal, b, h, kvh, q_len, kv_len, d, block):
    g = torch.Generator().manual_seed(q_len * 31 + kv_len)
    q = (2 * torch.randn(b, h, q_len, d, generator=g)).to(device=device, dtype=dtype)
    k = (2 * torch.randn(b, kvh, kv_len, d, generator=g)).to(device=device, dtype=dtype)
    assert kernel_runs(q, block)
    out = last_rows_block_lse(q, k, block, causal, d**-0.5)
    want = last_rows_block_lse_reference(q.double(), k.double(), block, causal, d**-0.5).float()
    rows, nk = exact_query_rows(q_len, block), math.ceil(kv_len / block)
    assert out.shape == (b, kvh, h // kvh * rows, nk)
    seen = torch.isfinite(want)
    assert torch.equal(torch.isfinite(out), seen)  # -inf exactly where a query sees none of the block
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert ((out - want)[seen].abs().max() / want[seen].abs().max()) < tol
    if causal and q_len == kv_len:
        assert not seen.all()  # the last block's queries see part of their own block only


def test_unsupported_block_size_takes_the_reference():
    q, k = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    assert not kernel_runs(q, 24)
    torch.testing.assert_close(last_rows_block_lse(q, k, 24, True, 0.25),
                               last_rows_block_lse_reference(q, k, 24, True, 0.25))


@pytest.mark.parametrize("device", DEVICES)
def test_op_passes_opcheck(device):
    q, k = torch.randn(1, 4, 40, 16, device=device), torch.randn(1, 2, 40, 16, device=device)
    torch.library.opcheck(torch.ops.dam.last_rows_block_lse.default, (q, k, 16, True, 0.25))
