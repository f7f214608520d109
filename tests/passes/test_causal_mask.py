"""Reading a materialised causal mask as is_causal=True: only when the mask is exactly causal at every size."""

import pytest
import torch

import dam_compile
from dam_compile.passes.find_sdpa import find_sdpa_sites
from dam_compile.passes.pipeline import rewrite_attention
from dam_compile.passes import causal_mask
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


# Masks built from a [B, N] tensor input ``p`` (an attention_mask), i the positions: causal AND a per-key vector
# is read as is_causal with the key row; anything else reading the input is kept.
PADDED_MASKS = {
    "causal and key padding": (lambda i, p: causal(i) & p[:, None, None, :].bool(), True),
    "causal and query padding": (lambda i, p: causal(i) & p[:, None, :, None].bool(), False),
    "causal or key padding": (lambda i, p: causal(i) | p[:, None, None, :].bool(), False),
    "key padding alone": (lambda i, p: p[:, None, None, :].bool().expand(-1, 1, i.numel(), -1), False),
    "window of 30 and key padding": (lambda i, p: window(30)(i) & p[:, None, None, :].bool(), False),
}


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("name", list(PADDED_MASKS))
def test_a_mask_reading_a_tensor_input_is_read_only_as_causal_and_key_padding(name, static):
    make_mask, readable = PADDED_MASKS[name]

    def f(q, k, v, padding):
        return sdpa(q, k, v, attn_mask=make_mask(torch.arange(q.shape[-2]), padding))

    q, k, v = (torch.randn(2, 2, 40, 16) for _ in range(3))
    padding = torch.ones(2, 40, dtype=torch.long)
    padding[1, :9] = 0
    for t, dim in ((q, 2), (k, 2), (v, 2), (padding, 1)) if not static else ():
        torch._dynamo.mark_dynamic(t, dim)
    (gm,) = capture_graph(f, q, k, v, padding)
    (site,) = find_sdpa_sites(gm.graph)
    read = read_causal_mask(site)
    if not readable:
        assert read is site
        return
    assert read.is_causal is True and read.attn_mask.args == (site.attn_mask, causal_mask.KEY_PADDING_ROW)
    assert tuple(causal_mask.example_value(read.attn_mask).shape[-2:])[0] == 1


def test_a_rectangular_causal_mask_is_kept():
    """SDPA's is_causal is top-left aligned: with more keys than queries it is another mask."""
    def f(q, k, v):
        i, j = torch.arange(q.shape[-2]), torch.arange(k.shape[-2])
        return sdpa(q, k, v, attn_mask=j[None, :] <= i[:, None] + (k.shape[-2] - q.shape[-2]))

    q = torch.randn(1, 2, 24, 16)
    (gm,) = capture_graph(f, q, torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16))
    (site,) = find_sdpa_sites(gm.graph)
    assert read_causal_mask(site) is site


def window(size):
    return lambda i: causal(i) & (i[:, None] - i[None, :] < size)


# A static graph runs at its one size (40 here): a window wider than that is the causal mask there.
STATIC_MASKS = {
    "causal": (causal, True),
    "causal, float": (MASKS["causal, float"][0], True),
    "anti-causal": (MASKS["anti-causal"][0], False),
    "window of 30": (window(30), False),
    "window of 100": (window(100), True),
    "all true": (MASKS["all true"][0], False),
}


@pytest.fixture(params=["checked at its size", "length lifted"])
def lifted(request, monkeypatch):
    """Check static masks exactly, or as a long graph does: with the length lifted into a sampled size (the
    exact check is capped below 40 x 40 here, as it is at 8K x 8K for real)."""
    if request.param == "length lifted":
        monkeypatch.setattr(causal_mask, "MAX_SAMPLE_ELEMENTS", 39 * 39)
    return request.param == "length lifted"


@pytest.mark.parametrize("name", list(STATIC_MASKS))
def test_a_static_graph_mask_is_read_as_is_causal_only_when_causal(name, lifted):
    make_mask, is_causal = STATIC_MASKS[name]
    (gm,) = capture_graph(attention_with(make_mask), *(torch.randn(1, 2, 40, 16) for _ in range(3)))
    (site,) = find_sdpa_sites(gm.graph)
    assert isinstance(causal_mask.example_value(site.query).shape[-2], int)  # no size symbol in the graph
    read = read_causal_mask(site)
    # Lifted, the 100-token window is sampled beyond 100 tokens, where it is no longer causal: kept (safe side).
    expected = is_causal and not (lifted and name == "window of 100")
    assert (read.attn_mask is None and read.is_causal is True) == expected
    if not expected:
        assert read is site


def test_lifting_keeps_every_constant_but_the_length():
    """At 40 tokens a window of 39 is not causal; the constant 39 must survive the lift of 40."""
    (gm,) = capture_graph(attention_with(window(39)), *(torch.randn(1, 2, 40, 16) for _ in range(3)))
    (site,) = find_sdpa_sites(gm.graph)
    assert read_causal_mask(site) is site


def hf_rewrite(model, padded=False, static=False):
    ids = ids_for("llama", batch=2 if padded else 1, n=48)
    inputs = dict(input_ids=ids)
    if padded:
        inputs["attention_mask"] = torch.ones_like(ids)
        inputs["attention_mask"][1, :7] = 0
    for t in inputs.values() if not static else ():
        torch._dynamo.mark_dynamic(t, 1)
    with torch.no_grad():
        (gm,) = capture_graph(lambda **kw: model(**kw, use_cache=False).logits, **inputs)
    return rewrite_attention(gm, DAMConfig(**CPU_SPARSE).mask_options())


def is_key_row(mask):
    """The op's mask is the last row ([B, 1, 1, N]) of the model's causal-and-padding mask."""
    return isinstance(mask, torch.fx.Node) and mask.args[1:] == (causal_mask.KEY_PADDING_ROW,)


@pytest.mark.parametrize("name,padded", [("llama", False), ("qwen2", False), ("llama", True)])
def test_hf_prompt_mask_becomes_is_causal(name, padded):
    """Unpadded: no mask at all (where HF passes one, it is read away). Padded: is_causal and the key row."""
    result = hf_rewrite(build(name), padded)
    assert result.sites and all(s.decision == "sparse" for s in result.sites)
    masks = sparse_op_masks(result)
    assert masks and all(is_causal is True for _, is_causal in masks)
    if padded:
        assert all(is_key_row(mask) for mask, _ in masks)
        assert all("key padding vector" in s.reason for s in result.sites)
    else:
        assert all(mask is None for mask, _ in masks)


def sparse_op_masks(result):
    return [(node.args[10], node.kwargs["is_causal"]) for node in result.graph_module.graph.nodes
            if node.target is torch.ops.dam.sparse_attention.default]


@pytest.mark.parametrize("name,padded", [("llama", False), ("qwen2", False), ("llama", True)])
def test_hf_static_first_compile_runs_causal_without_a_mask(name, padded, lifted):
    """torch.compile's default static graph: an unpadded prompt reaches the op as is_causal (whether HF passed
    the mask or not), a padded batch as is_causal with its key padding row."""
    result = hf_rewrite(build(name), padded, static=True)
    assert result.sites and all(s.decision == "sparse" for s in result.sites)
    masks = sparse_op_masks(result)
    assert len(masks) == len(result.sites) and all(is_causal is True for _, is_causal in masks)
    assert all((is_key_row(mask) if padded else mask is None) for mask, _ in masks)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_hf_sliding_window_mask_is_not_read_as_causal(static, lifted):
    config = build("mistral").config
    config.sliding_window = 16  # below the 48-token prompt
    result = hf_rewrite(transformers.MistralForCausalLM(config).eval(), static=static)
    assert result.sites and not any("read as is_causal" in s.reason for s in result.sites)
    assert all(mask is not None for mask, _ in sparse_op_masks(result))


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


@pytest.mark.parametrize("min_seq_len", [0, 1000], ids=["sparse", "dense at run time"])
def test_hf_padded_prefill_with_the_key_row_equals_eager(min_seq_len):
    """The causal-and-padding mask read as is_causal plus its key row: the sparse op and its dense path (which
    joins the two back into one mask for SDPA) both compute the model."""
    model = build("llama")
    ids = ids_for("llama", batch=2, n=48)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :11] = 0
    valid = attention_mask.bool()
    run = torch.compile(model, backend="dam", options={**CPU_SPARSE, "min_seq_len": min_seq_len})
    with torch.no_grad():
        out = run(input_ids=ids, attention_mask=attention_mask).logits
        eager = model(input_ids=ids, attention_mask=attention_mask).logits
    assert rel_err(out[valid], eager[valid]) < 1e-5
    path = "reference: kernel='reference'" if min_seq_len == 0 else "dense: sequence shorter than min_seq_len=1000"
    assert dam_compile.runtime_stats() == {path: 2}
