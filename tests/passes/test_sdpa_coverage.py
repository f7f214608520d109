"""Direct ``scaled_dot_product_attention`` calls through ``backend="dam"``: every flag combination stays
exact with the all-blocks plan, and equals the block-sparse reference with a sparse plan."""

import itertools

import pytest
import torch

import dam_compile
from dam_compile.plan.reference import block_sparse_attention_reference
from dam_compile.plan.structured_plans import streaming_plan

from dam_testing import CPU_SPARSE, rel_err, sdpa, tolerance

MASKS = [None, "bool2d", "bool4d_batch", "float4d_heads", "bool3d"]


def make_inputs(b, h, kvh, q_len, kv_len, d, dtype, transposed):
    if transposed:
        q = torch.randn(b, q_len, h, d, dtype=dtype).transpose(1, 2)
        k, v = (torch.randn(b, kv_len, kvh, d, dtype=dtype).transpose(1, 2) for _ in range(2))
    else:
        q = torch.randn(b, h, q_len, d, dtype=dtype)
        k, v = (torch.randn(b, kvh, kv_len, d, dtype=dtype) for _ in range(2))
    return q, k, v


def make_mask(kind, b, h, q_len, kv_len, dtype):
    if kind is None:
        return None
    shapes = {"bool2d": (q_len, kv_len), "bool4d_batch": (b, 1, q_len, kv_len), "bool3d": (1, q_len, kv_len),
              "float4d_heads": (1, h, q_len, kv_len)}
    if kind.startswith("bool"):
        mask = torch.rand(shapes[kind]) < 0.75
        mask[..., 0] = True  # SDPA's fused CPU paths give NaN for a fully masked row
        return mask
    return torch.randn(shapes[kind]).to(dtype)


CASES = [
    dict(is_causal=causal, mask=mask, kvh=kvh, lengths=lengths, dtype=dtype)
    for causal, mask, kvh, lengths, dtype in itertools.product(
        [True, False], MASKS, [4, 2], [(48, 48), (33, 57)], [torch.float32, torch.bfloat16]
    )
    if not (causal and mask is not None)
]


def case_id(c):
    return f"causal={c['is_causal']}-mask={c['mask']}-kvh={c['kvh']}-L={c['lengths']}-{str(c['dtype'])[6:]}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_sdpa_call_matrix(case):
    b, h, d = 2, 4, 16
    q_len, kv_len = case["lengths"]
    # Alternate layouts and scales across the matrix so each shows up with every other flag.
    transposed = (q_len + case["kvh"]) % 2 == 0
    scale = 0.3 if case["mask"] in (None, "bool2d") else None
    q, k, v = make_inputs(b, h, case["kvh"], q_len, kv_len, d, case["dtype"], transposed)
    mask = make_mask(case["mask"], b, h, q_len, kv_len, case["dtype"])
    kwargs = dict(attn_mask=mask, is_causal=case["is_causal"], scale=scale, enable_gqa=case["kvh"] != h)

    out = torch.compile(sdpa, backend="dam", options=CPU_SPARSE)(q, k, v, **kwargs)
    assert dam_compile.graph_reports()[-1].rewritten == 1
    assert rel_err(out, sdpa(q.float(), k.float(), v.float(), **{**kwargs, "attn_mask": None if mask is None else mask if mask.dtype == torch.bool else mask.float()})) < tolerance(case["dtype"])

    torch._dynamo.reset()
    sparse = {**CPU_SPARSE, "mask_source": "streaming", "sink_blocks": 1, "local_blocks": 1}
    out = torch.compile(sdpa, backend="dam", options=sparse)(q, k, v, **kwargs)
    plan = streaming_plan(q_len, kv_len, 16, case["is_causal"], 1, 1)
    expected = block_sparse_attention_reference(q, k, v, plan, **kwargs)
    assert rel_err(out, expected) < tolerance(case["dtype"])


def test_float16_and_equal_heads_without_gqa_flag():
    q, k, v = make_inputs(1, 4, 4, 40, 40, 32, torch.float16, False)
    out = torch.compile(sdpa, backend="dam", options=CPU_SPARSE)(q, k, v, is_causal=True)
    assert rel_err(out, sdpa(q.float(), k.float(), v.float(), is_causal=True)) < tolerance(torch.float16)


def test_dropout_call_stays_dense_and_keeps_sdpa():
    q, k, v = make_inputs(1, 2, 2, 32, 32, 16, torch.float32, False)
    torch.compile(sdpa, backend="dam", options=CPU_SPARSE)(q, k, v, dropout_p=0.5)
    (site,) = dam_compile.graph_reports()[-1].sites
    assert site.decision == "dense" and "dropout_p=0.5" in site.reason


def test_lengths_change_without_wrong_answers():
    """Dynamo recompiles once with dynamic shapes; the plan ops then see symbolic lengths."""
    f = torch.compile(sdpa, backend="dam", options={**CPU_SPARSE, "mask_source": "streaming", "local_blocks": 1})
    for n in (40, 57, 73, 96):
        q, k, v = make_inputs(1, 4, 2, n, n, 16, torch.float32, False)
        plan = streaming_plan(n, n, 16, True, 1, 1)
        expected = block_sparse_attention_reference(q, k, v, plan, is_causal=True, enable_gqa=True)
        assert rel_err(f(q, k, v, is_causal=True, enable_gqa=True), expected) < 1e-5
    assert len(dam_compile.graph_reports()) <= 2
