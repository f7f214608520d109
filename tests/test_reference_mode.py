"""``SparseReferenceMode`` (reference_mode.py): a model run eagerly with each attention call on the plan the backend
would give it, against float64 dense attention over the plan's token mask (written here); the calls it leaves
alone; and the plan lookups (``plan_call_for``, ``plan_for``) it shares with the other eager oracles. The mode
without the model but with dense layers: tests/ops/test_dense_layers.py."""

import pytest
import torch
import torch.nn.functional as F

from dam_compile.calibration.profile import DAMProfile
from dam_compile.config import DAMConfig
from dam_compile.passes.pipeline import NO_PROFILE_ENTRY
from dam_compile.reference_mode import SparseReferenceMode, plan_call_for, plan_for

from dam_testing import dense_oracle, rel_err

N, BLOCK = 72, 16  # a ragged last block
SPARSE = {"kernel": "reference", "min_seq_len": 0, "block_size": BLOCK, "dense_layers": 0}


class Attention(torch.nn.Module):
    def forward(self, q, k, v, **kwargs):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)


class Model(torch.nn.Module):
    """``layers.{0,1}.attn``, four query heads over two K/V heads; layer 1's query is layer 0's output."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.ModuleDict({"attn": Attention()}) for _ in range(2))

    def forward(self, q, k, v, **kwargs):
        for layer in self.layers:
            q = layer["attn"](q, k, v, **kwargs)
        return q


def qkv(n=N, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, n, 16, generator=g), torch.randn(batch, 2, n, 16, generator=g),
            torch.randn(batch, 2, n, 16, generator=g))


def causal(n):
    return torch.ones(n, n, dtype=torch.bool).tril()


def streaming_tokens(n, sink=1, local=1):
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return (j <= i) & ((j // BLOCK < sink) | (i // BLOCK - j // BLOCK < local))


def oracle_model(q, k, v, allowed, **kwargs):
    """Both layers in float64 over the token mask ``allowed``."""
    for _ in range(2):
        q = dense_oracle(q, k, v, allowed, **kwargs)
    return q


def test_with_a_dense_plan_the_model_is_dense_attention(monkeypatch):
    import dam_compile.reference_mode as reference_mode

    calls = []
    reference = reference_mode.block_sparse_attention_reference
    monkeypatch.setattr(reference_mode, "block_sparse_attention_reference",
                        lambda *a, **kw: calls.append(a[3]) or reference(*a, **kw))
    q, k, v = qkv()
    with torch.no_grad(), SparseReferenceMode({**SPARSE, "mask_source": "dense"}) as mode:
        out = Model()(q, k, v, is_causal=True)
    assert mode.config.source == "dense"
    assert rel_err(out, oracle_model(q, k, v, causal(N))) < 1e-5
    assert len(calls) == 2  # both calls ran the block-sparse reference, on plans of every visible block
    assert all(float(plan.kept_blocks().sum()) == 15 for plan in calls)  # 5 query blocks: 1 + 2 + ... + 5


@pytest.mark.parametrize("sink, local", [(1, 1), (0, 2)])
def test_with_a_streaming_plan_the_model_attends_to_the_sink_and_window_only(sink, local):
    q, k, v = qkv(seed=sink + local)
    options = {**SPARSE, "mask_source": "streaming", "sink_blocks": sink, "local_blocks": local}
    with torch.no_grad(), SparseReferenceMode(options):
        out = Model()(q, k, v, is_causal=True, scale=0.4)
    assert rel_err(out, oracle_model(q, k, v, streaming_tokens(N, sink, local), scale=0.4)) < 1e-5
    assert rel_err(out, oracle_model(q, k, v, causal(N), scale=0.4)) > 1e-2  # the plan really drops keys


def test_with_an_attention_mask_the_plan_and_the_mask_both_apply():
    q, k, v = qkv()
    pad = torch.ones(2, 1, N, N, dtype=torch.bool)
    pad[1, ..., :10] = False  # sequence 1: ten padding keys
    mask = pad & causal(N)
    with torch.no_grad(), SparseReferenceMode({**SPARSE, "mask_source": "streaming", "local_blocks": 2}):
        out = Model()(q, k, v, attn_mask=mask)
    expected = oracle_model(q, k, v, streaming_tokens(N, 1, 2), attn_mask=mask)
    assert rel_err(out, expected) < 1e-5


def test_dynamic_plans_are_the_ones_plan_for_builds():
    """Each call attends over the token mask of ``plan_for``'s plan for the query and key it gets."""
    from dam_compile.plan.reference import token_mask

    class Recording(SparseReferenceMode):
        def on_attention(self, name, a):
            queries.append(a["query"])
            return super().on_attention(name, a)

    n, queries = 96, []
    q, k, v = qkv(n, batch=1)
    options = {**SPARSE, "mask_source": "dynamic", "density": 0.2, "local_blocks": 1}
    with torch.no_grad(), Recording(options):
        out = Model()(q, k, v, is_causal=True)
    assert len(queries) == 2 and queries[0] is q
    config = DAMConfig.from_options(options)
    outputs = []
    for query in queries:
        allowed = token_mask(plan_for(config, query, k, True), n, n, True)
        assert allowed.float().mean() < 0.8 * causal(n).float().mean()  # sparse: equality means something
        outputs.append(dense_oracle(query, k, v, allowed))
    assert rel_err(queries[1], outputs[0]) < 1e-5 and rel_err(out, outputs[1]) < 1e-5


def test_calls_the_backend_leaves_dense_run_unchanged():
    q, k, v = qkv()
    model = Model()
    streaming = {**SPARSE, "mask_source": "streaming"}
    with torch.no_grad():
        for options, kwargs, query in [
            ({**streaming, "kernel": "auto"}, dict(is_causal=True), q),  # no sparse kernel for CPU tensors
            ({**streaming, "min_seq_len": N + 1}, dict(is_causal=True), q),  # shorter than min_seq_len
            (streaming, dict(is_causal=True), q[:, :, -1:]),  # a decode step the pass leaves as SDPA
        ]:
            expected = model(query, k, v, **kwargs)
            with SparseReferenceMode(options):
                assert torch.equal(model(query, k, v, **kwargs), expected), (options, kwargs)
        torch.manual_seed(1)
        expected = model(q, k, v, dropout_p=0.5)
        torch.manual_seed(1)
        with SparseReferenceMode(streaming):
            assert torch.equal(model(q, k, v, dropout_p=0.5), expected)  # training calls stay the model's


def test_the_first_dense_layers_run_dense_when_the_model_names_them():
    q, k, v = qkv()
    model = Model()
    options = {**SPARSE, "mask_source": "streaming", "local_blocks": 1, "dense_layers": 1}
    with torch.no_grad(), SparseReferenceMode(options, model):
        out = model(q, k, v, is_causal=True)
    first = dense_oracle(q, k, v, causal(N))
    assert rel_err(out, dense_oracle(first, k, v, streaming_tokens(N))) < 1e-5


def band_profile(module="layers.0.attn", pcl=32):
    rows, cols = torch.arange(pcl)[:, None], torch.arange(pcl)[None, :]
    attention = ((rows - cols >= 0) & (rows - cols <= 2)).float()
    attention = (attention / attention.sum(-1, keepdim=True)).expand(4, -1, -1).clone()
    return DAMProfile.from_mean_attention({module: attention}, {module: True}, box_cox_lambda=0.5, tau=0.3, mu=0.8,
                                          model_fingerprint="x", samples=1)


def test_a_calibrated_source_is_refused_and_plan_lookups_need_the_module():
    q, k, v = qkv()
    config = DAMConfig.from_options({**SPARSE, "profile": band_profile()})
    with pytest.raises(ValueError, match="dam_compile.plan.pattern_plan"), SparseReferenceMode(config):
        Model()(q, k, v, is_causal=True)
    with pytest.raises(ValueError, match="module: the calibrated source"):
        plan_call_for(config, q, True)
    with pytest.raises(ValueError, match=f"{NO_PROFILE_ENTRY} 'layers.7.attn'"):
        plan_call_for(config, q, True, module="layers.7.attn")


def test_plan_for_a_calibrated_module_is_its_extended_mask():
    from dam_compile.plan.dam_patterns import extended_mask
    from dam_compile.plan.reference import token_mask

    profile = band_profile()
    q, k, _ = qkv()
    config = DAMConfig.from_options({**SPARSE, "profile": profile})
    plan = plan_for(config, q, k, True, module="model.layers.0.attn")  # a wrapper's path finds the entry
    assert plan.has_token_pattern
    expected = extended_mask(profile.modules["layers.0.attn"].patterns, N, N, True)
    assert torch.equal(token_mask(plan, N, N, True)[0], expected)
    assert expected.float().mean() < 0.2  # the band: three diagonals
