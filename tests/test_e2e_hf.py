"""The whole path on tiny HuggingFace models: one compile serves every prompt length, decode steps do not
recompile, sparse generate() equals its eager oracle, K/V are read before repeat_kv, and no tensor of the
compiled run is as large as the N x N score matrix."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dam_compile
from dam_compile.reference_mode import SparseReferenceMode

from dam_testing import CPU_SPARSE, rel_err
from hf_models import LAYERS, build, ids_for, main_output

DYNAMIC = {**CPU_SPARSE, "mask_source": "dynamic", "density": 0.3}
STREAMING = {**CPU_SPARSE, "mask_source": "streaming", "sink_blocks": 1, "local_blocks": 1}


def compiled_graphs() -> int:
    return len(dam_compile.graph_reports())


@pytest.mark.slow
def test_ten_prompt_lengths_compile_at_most_twice():
    model = build("llama")
    compiled = torch.compile(model, backend="dam", options=DYNAMIC)
    with torch.no_grad():
        for n in (40, 57, 64, 90, 33, 120, 71, 48, 100, 129):
            x = ids_for("llama", n=n)
            with SparseReferenceMode(DYNAMIC, model):
                expected = model(x).logits
            assert rel_err(compiled(x).logits, expected) < 1e-5, n
    assert compiled_graphs() <= 2  # the first length, then one graph with a symbolic length


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.slow
def test_decode_steps_do_not_recompile_per_step(cache):
    model, x = build("llama"), ids_for("llama", n=40)
    model.forward = torch.compile(model.forward, backend="dam", options=STREAMING)
    model.generate(x, max_new_tokens=12, do_sample=False, pad_token_id=0, cache_implementation=cache)
    decode_graphs = [r for r in dam_compile.graph_reports() if r.sites and r.sites[0].query.endswith(", 1, 16]")]
    assert 1 <= len(decode_graphs) <= 2 and compiled_graphs() <= 3


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "gpt2"])
@pytest.mark.slow
def test_sparse_generate_equals_its_eager_oracle(name):
    """Streaming masks change the tokens; the compiled model must change them exactly as the eager oracle does."""
    model, x = build(name), ids_for(name, n=48)
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    with SparseReferenceMode(STREAMING, model):
        expected = model.generate(x, **kwargs)
    model.forward = torch.compile(model.forward, backend="dam", options=STREAMING)
    out = model.generate(x, **kwargs)
    assert torch.equal(out, expected)
    assert dam_compile.runtime_stats() == {"reference: kernel='reference'": LAYERS * 8}


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral"])
def test_padded_grouped_attention_reads_kv_before_repeat(name):
    """With a mask HF repeats each K/V head for its query heads; the rewrite reads the unrepeated K/V."""
    attention_mask = torch.ones(2, 40, dtype=torch.long)
    attention_mask[1, :11] = 0
    reasons = padded_run(name, attention_mask, CPU_SPARSE)
    assert len(reasons) == LAYERS and all("before repeat_kv" in r for r in reasons), reasons


def padded_run(name: str, attention_mask: torch.Tensor, options: dict) -> list[str]:
    """``name`` compiled with ``options``, called with ``attention_mask``: equal to eager on every valid position.
    Returns each site's reason."""
    model, x = build(name), ids_for(name, batch=attention_mask.shape[0], n=attention_mask.shape[1])
    with torch.no_grad():
        eager = model(x, attention_mask=attention_mask).logits
        out = torch.compile(model, backend="dam", options=options)(x, attention_mask=attention_mask).logits
    valid = attention_mask.bool()
    assert rel_err(out[valid], eager[valid]) < 1e-5
    return [s.reason for r in dam_compile.graph_reports() for s in r.sites]


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("source", ["dynamic", "streaming"])
@pytest.mark.slow
def test_no_tensor_as_large_as_the_score_matrix(source):
    """Mask generation and the fused kernel never build a [*, N, N] tensor (the interpreter runs the kernel on
    NumPy, so only the graph's and the plan's own tensors are seen)."""
    n = 512
    model, x = build("llama"), ids_for("llama", n=n)
    options = {**(DYNAMIC if source == "dynamic" else STREAMING), "kernel": "triton", "block_size": 32}
    compiled = torch.compile(model, backend="dam", options=options)
    with torch.no_grad():
        compiled(x)  # compile outside the mode
        with LargestTensor() as seen:
            compiled(x)
    assert dam_compile.runtime_stats().get("triton: kernel='triton' (fused block-sparse Triton kernel)", 0) >= LAYERS
    assert 0 < seen.largest < n * n


class AttentionMasks(TorchDispatchMode):
    """Records, for every SDPA kernel that runs, whether it was given a mask."""

    def __init__(self):
        super().__init__()
        self.masked: list[bool] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "scaled_dot_product" in str(func):
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            self.masked.append(isinstance(mask, torch.Tensor))
        return func(*args, **kwargs)


def padding_cases(batch: int, n: int) -> dict[str, torch.Tensor]:
    ones = torch.ones(batch, n, dtype=torch.long)
    left, holes = ones.clone(), ones.clone()
    left[-1, : n // 3] = 0
    holes[-1, n // 2: n // 2 + 3] = 0
    return {"all ones": ones, "left padding": left, "holes": holes}


DENSE_ON_CPU = {**CPU_SPARSE, "kernel": "auto"}  # every call takes the op's dense path (CPU tensors)


@pytest.mark.parametrize("case", ["all ones", "left padding", "holes"])
@pytest.mark.parametrize("options", [DENSE_ON_CPU, CPU_SPARSE], ids=["dense path", "sparse reference"])
def test_attention_mask_keeps_the_models_answers(case, options):
    """``model(ids, attention_mask=...)`` as generate() calls it: equal to eager on every valid position, for an
    all-ones mask, left padding and a mask with holes; the mask is read once, by dam::key_padding."""
    reasons = padded_run("llama", padding_cases(2, 40)[case], options)
    assert len(reasons) == LAYERS and all("dam::key_padding" in r for r in reasons), reasons


@pytest.mark.parametrize("case, masked", [("all ones", False), ("holes", True)])
def test_an_all_ones_attention_mask_runs_plain_causal_attention(case, masked):
    """What generate() passes costs nothing: with an all-ones mask every attention call is SDPA's causal kernel
    with no mask at all; only a mask with holes still reaches SDPA."""
    model, x = build("llama"), ids_for("llama", n=48)
    attention_mask = padding_cases(1, 48)[case]
    compiled = torch.compile(model, backend="dam", options=DENSE_ON_CPU)
    with torch.no_grad():
        compiled(x, attention_mask=attention_mask)
        with AttentionMasks() as seen:
            compiled(x, attention_mask=attention_mask)
    assert len(seen.masked) == LAYERS and all(m is masked for m in seen.masked), seen.masked


@pytest.mark.slow
def test_dense_decode_steps_stay_the_models_sdpa_until_the_cache_grows_past_the_limit():
    """A decode step that would run dense is decided when its graph compiles: the site stays the model's SDPA
    call (no op, no Python of ours per token) for every cache below min_seq_len, and the step that reaches it
    compiles one sparse decode graph. The tokens are the eager oracle's."""
    options = {**STREAMING, "min_seq_len": 60}
    model, x = build("llama"), ids_for("llama", n=40)
    kwargs = dict(max_new_tokens=30, min_new_tokens=30, do_sample=False, pad_token_id=0)
    with SparseReferenceMode(options, model):
        expected = model.generate(x, **kwargs)
    model.forward = torch.compile(model.forward, backend="dam", options=options, dynamic=True)
    assert torch.equal(model.generate(x, **kwargs), expected)
    decode = [r for r in dam_compile.graph_reports() if r.sites and r.sites[0].query.endswith(", 1, 16]")]
    assert [r.sites[0].decision for r in decode] == ["dense", "sparse"]
    assert "decided when compiled" in decode[0].sites[0].reason
    # Steps with 60 to 69 cached keys ran the sparse op; none below it went through the op.
    assert dam_compile.runtime_stats()["reference: kernel='reference'"] == LAYERS * 10


@pytest.mark.parametrize("options", [DENSE_ON_CPU, CPU_SPARSE], ids=["dense path", "sparse reference"])
@pytest.mark.slow
def test_batched_left_padded_generate_gives_eagers_tokens(options):
    """Batched generate() of two prompts of different lengths (left padding): the prefill's key padding runs as
    key ranges, every decode step reads the padding row; the tokens are eager's."""
    model, x = build("llama"), ids_for("llama", batch=2, n=40)
    attention_mask = padding_cases(2, 40)["left padding"]
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = model.generate(x, **kwargs)
    model.forward = torch.compile(model.forward, backend="dam", options=options)
    assert torch.equal(model.generate(x, **kwargs), expected)
