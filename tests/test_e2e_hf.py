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
def test_decode_steps_do_not_recompile_per_step(cache):
    model, x = build("llama"), ids_for("llama", n=40)
    model.forward = torch.compile(model.forward, backend="dam", options=STREAMING)
    model.generate(x, max_new_tokens=12, do_sample=False, pad_token_id=0, cache_implementation=cache)
    decode_graphs = [r for r in dam_compile.graph_reports() if r.sites and r.sites[0].query.endswith(", 1, 16]")]
    assert 1 <= len(decode_graphs) <= 2 and compiled_graphs() <= 3


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "gpt2"])
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
    model, x = build(name), ids_for(name, batch=2, n=40)
    attention_mask = torch.ones_like(x)
    attention_mask[1, :11] = 0
    with torch.no_grad():
        eager = model(x, attention_mask=attention_mask).logits
        out = torch.compile(model, backend="dam", options=CPU_SPARSE)(x, attention_mask=attention_mask).logits
    valid = attention_mask.bool()
    assert rel_err(out[valid], eager[valid]) < 1e-5
    sites = [s for r in dam_compile.graph_reports() for s in r.sites]
    assert len(sites) == LAYERS and all("before repeat_kv" in s.reason for s in sites), [s.reason for s in sites]


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
