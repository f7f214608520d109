"""Reading a materialised causal mask as is_causal=True: only when the mask is exactly causal at every size."""

import pytest
import torch

import dam_compile
from dam_compile.passes import find_sdpa_sites, rewrite_attention
from dam_compile.passes.causal_mask import read_causal_mask
from dam_compile.config import DAMConfig

from dam_testing import CPU_SPARSE, capture_graph, rel_err, sdpa
from hf_models import build, ids_for, transformers


def causal(i):
    return i[None, :] <= i[:, None]


MASKS = {
    "causal": (causal, True),
    "causal, float": (lambda i: torch.zeros(()).masked_fill(~causal(i), torch.finfo(torch.float32).min), True),
    "causal and a 4-D broadcast": (lambda i: causal(i)[None, None].expand(1, 1, -1, -1), True),
    "anti-causal": (lambda i: i[None, :] >= i[:, None], False),
    # Equal to the causal mask below 100 tokens: the check must sample beyond the constant.
    "window of 100": (lambda i: causal(i) & (i[:, None] - i[None, :] < 100), False),
    "causal above 300 tokens only": (lambda i: causal(i) | (i.numel() <= 300), False),
    "all true": (lambda i: torch.ones(i.numel(), i.numel(), dtype=torch.bool), False),
}


def attention_with(make_mask):
    def f(q, k, v):
        return sdpa(q, k, v, attn_mask=make_mask(torch.arange(q.shape[-2])))

    return f


def qkv(n=40):
    q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))
    for t in (q, k, v):
        torch._dynamo.mark_dynamic(t, 2)
    return q, k, v


@pytest.mark.parametrize("name", list(MASKS))
def test_only_an_exactly_causal_size_only_mask_is_read_as_is_causal(name):
    make_mask, is_causal = MASKS[name]
    (gm,) = capture_graph(attention_with(make_mask), *qkv())
    (site,) = find_sdpa_sites(gm.graph)
    read = read_causal_mask(site)
    assert (read.attn_mask is None and read.is_causal is True) == is_causal
    if not is_causal:
        assert read is site


def test_a_mask_computed_from_a_tensor_input_is_kept():
    def f(q, k, v, padding):
        return sdpa(q, k, v, attn_mask=causal(torch.arange(q.shape[-2])) & padding[:, None, None, :].bool())

    q, k, v = qkv()
    padding = torch.ones(1, 40, dtype=torch.long)
    torch._dynamo.mark_dynamic(padding, 1)
    (gm,) = capture_graph(f, q, k, v, padding)
    (site,) = find_sdpa_sites(gm.graph)
    assert read_causal_mask(site) is site


def test_a_rectangular_causal_mask_is_kept():
    """SDPA's is_causal is top-left aligned: with more keys than queries it is another mask."""
    def f(q, k, v):
        i, j = torch.arange(q.shape[-2]), torch.arange(k.shape[-2])
        return sdpa(q, k, v, attn_mask=j[None, :] <= i[:, None] + (k.shape[-2] - q.shape[-2]))

    q = torch.randn(1, 2, 24, 16)
    (gm,) = capture_graph(f, q, torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16))
    (site,) = find_sdpa_sites(gm.graph)
    assert read_causal_mask(site) is site


def hf_rewrite(model, padded=False):
    ids = ids_for("llama", batch=2 if padded else 1, n=48)
    inputs = dict(input_ids=ids)
    if padded:
        inputs["attention_mask"] = torch.ones_like(ids)
        inputs["attention_mask"][1, :7] = 0
    for t in inputs.values():
        torch._dynamo.mark_dynamic(t, 1)
    with torch.no_grad():
        (gm,) = capture_graph(lambda **kw: model(**kw, use_cache=False).logits, **inputs)
    return rewrite_attention(gm, DAMConfig(**CPU_SPARSE))


@pytest.mark.parametrize("name,padded,read", [("llama", False, True), ("qwen2", False, True), ("llama", True, False)])
def test_hf_unpadded_prompt_mask_becomes_is_causal(name, padded, read):
    result = hf_rewrite(build(name), padded)
    assert result.sites and all(s.decision == "sparse" for s in result.sites)
    assert all(("read as is_causal=True" in s.reason) == read for s in result.sites)
    for node in result.graph_module.graph.nodes:
        if node.target is torch.ops.dam.sparse_attention.default:
            mask, is_causal = node.args[10], node.args[12]
            assert (mask is None and is_causal is True) == read


def test_hf_sliding_window_mask_is_not_read_as_causal():
    config = build("mistral").config
    config.sliding_window = 16  # below the 48-token prompt
    result = hf_rewrite(transformers.MistralForCausalLM(config).eval())
    assert result.sites and not any("read as is_causal" in s.reason for s in result.sites)


def test_hf_prefill_with_the_mask_read_as_causal_equals_eager():
    model = build("llama")
    run = torch.compile(lambda **kw: model(**kw, use_cache=False).logits, backend="dam", options=CPU_SPARSE)
    dam_compile.clear_graph_reports()
    torch._dynamo.reset()
    for n in (40, 57):
        ids = ids_for("llama", n=n)
        torch._dynamo.mark_dynamic(ids, 1)
        with torch.no_grad():
            assert rel_err(run(input_ids=ids), model(input_ids=ids, use_cache=False).logits) < 1e-5
    sites = [s for g in dam_compile.graph_reports() for s in g.sites]
    assert sites and all("read as is_causal=True" in s.reason for s in sites)
