"""``PlanMeasure`` (report/site_measures.py): per attention module, the density and attention-mass recall of the
plan the backend builds for the call, its block table and the op's run-time path; recall against a float64
softmax written here, densities against block counts."""

import pytest
import torch
import torch.nn.functional as F

from dam_compile.config import DAMConfig
from dam_compile.report.site_measures import PlanMeasure

N, BLOCK, SCALE = 64, 16, 0.3
STREAMING = dict(mask_source="streaming", sink_blocks=1, local_blocks=1, block_size=BLOCK, dense_layers=0)


class Attention(torch.nn.Module):
    def __init__(self, dropout_p: float = 0.0):
        super().__init__()
        self.dropout_p = dropout_p

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=SCALE,
                                              enable_gqa=True, dropout_p=self.dropout_p)


class Model(torch.nn.Module):
    """``layers.{0,1}.attn``: four query heads over two K/V heads; layer 1 reads layer 0's output as its query."""

    def __init__(self, dropout_p: float = 0.0):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.ModuleDict({"attn": Attention(dropout_p)}) for _ in range(2))

    def forward(self, q, k, v, mask=None):
        for layer in self.layers:
            q = layer["attn"](q, k, v, mask)
        return q


def qkv(batch=2, n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, n, 8, generator=g), torch.randn(batch, 2, n, 8, generator=g),
            torch.randn(batch, 2, n, 8, generator=g))


def measure(options, *inputs, model=None, progress=None):
    model = model or Model()
    with torch.no_grad(), PlanMeasure(model, DAMConfig.from_options(options), progress) as probe:
        model(*inputs)
    return probe.sites


def streaming_tokens(n: int) -> torch.Tensor:
    """bool ``[n, n]``: causal, and key block 0 or the query's own block (sink 1, local 1)."""
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return (j <= i) & ((j // BLOCK == 0) | (j // BLOCK == i // BLOCK))


def recall_by_hand(q, k, allowed) -> list[float]:
    """Per query head, the batch mean of the mean over rows of the exact (float64) softmax mass on allowed keys."""
    q, k = q.double(), k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    n = q.shape[-2]
    scores = (q @ k.transpose(-1, -2) * SCALE).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    probs = scores.softmax(-1)
    return (probs * allowed).sum(-1).mean(-1).mean(0).tolist()


def test_density_recall_and_blocks_of_a_streaming_plan_against_the_definitions():
    q, k, v = qkv()
    sites = measure({**STREAMING, "kernel": "reference", "min_seq_len": 0}, q, k, v)
    assert list(sites) == ["layers.0.attn", "layers.1.attn"]
    layer1_query = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE, enable_gqa=True)
    for name, query in (("layers.0.attn", q), ("layers.1.attn", layer1_query)):
        m = sites[name]
        assert (m.module_path, m.q_len, m.kv_len) == (name, N, N)
        assert m.density == pytest.approx([7 / 10] * 4)  # of 10 causal-visible blocks: 4 diagonal + 3 sink
        expected = recall_by_hand(query, k, streaming_tokens(N))
        assert m.recall == pytest.approx(expected, rel=1e-5)
        assert all(r < 0.95 for r in m.recall)  # the window really drops mass
        assert (m.path, m.path_reason) == ("reference", "kernel='reference'")
    blocks = torch.tensor([[1, 0, 0, 0], [2, 1, 0, 0], [2, 0, 1, 0], [2, 0, 0, 1]], dtype=torch.int8)
    assert torch.equal(sites["layers.0.attn"].blocks, blocks.expand(4, 4, 4))  # 1 partial (diagonal), 2 full


def test_a_dense_layer_counts_every_visible_block_and_names_why():
    q, k, v = qkv()
    sites = measure({**STREAMING, "dense_layers": 1, "kernel": "reference", "min_seq_len": 0}, q, k, v)
    first, second = sites["layers.0.attn"], sites["layers.1.attn"]
    assert first.density == pytest.approx([1.0] * 4) and first.recall == pytest.approx([1.0] * 4, rel=1e-6)
    assert first.path == "dense" and "dense_layers=1" in first.path_reason
    assert torch.equal(first.blocks[0], torch.tensor([[1, 0, 0, 0], [2, 1, 0, 0], [2, 2, 1, 0], [2, 2, 2, 1]],
                                                     dtype=torch.int8))
    assert second.density == pytest.approx([0.7] * 4)


def test_plans_are_built_where_the_op_would_run_dense():
    """Default options on CPU tensors of 64 tokens: the op would run dense (short, and no CPU kernel), yet the
    mask is measured as the configured source builds it."""
    sites = measure({**STREAMING}, *qkv())
    m = sites["layers.1.attn"]
    assert m.density == pytest.approx([0.7] * 4) and m.recall is not None
    assert m.path == "dense" and "shorter than min_seq_len=8192" in m.path_reason


def test_an_explicit_mask_is_measured_without_recall():
    q, k, v = qkv()
    mask = torch.ones(N, N, dtype=torch.bool).tril()
    m = measure({**STREAMING, "kernel": "reference", "min_seq_len": 0}, q, k, v, mask)["layers.0.attn"]
    assert m.recall is None and len(m.density) == 4 and all(0 < d <= 1 for d in m.density)


def test_decode_steps_and_training_calls_are_not_measured():
    q, k, v = qkv()
    assert measure(STREAMING, q[:, :, -1:], k, v) == {}
    assert measure(STREAMING, q, k, v, model=Model(dropout_p=0.5)) == {}


def test_each_module_keeps_its_last_call_and_progress_counts_every_call():
    class Bar:
        n = 0

        def update(self, count):
            self.n += count

    bar, model = Bar(), Model()
    config = DAMConfig.from_options(STREAMING)
    with torch.no_grad(), PlanMeasure(model, config, bar) as probe:
        model(*qkv(n=64))
        model(*qkv(n=48, seed=1))
    assert bar.n == 4
    assert {m.q_len for m in probe.sites.values()} == {48}
    assert probe.sites["layers.0.attn"].blocks.shape == (4, 3, 3)
