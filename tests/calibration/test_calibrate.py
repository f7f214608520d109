"""calibrate() (calibration/calibrate.py) on tiny HF models: the mean maps it captures, its profile through the file,
and compiling with it. Held-out samples and dynamic heads: test_holdout.py."""

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import dam_compile
from dam_compile import ProfileMismatchError, calibrate
from dam_compile.plan.reference import block_sparse_attention_reference
from dam_compile.plan.pattern_plan import pattern_plan
from dam_compile.passes.find_sdpa import bind_sdpa_args

from dam_testing import rel_err
from hf_models import VOCAB, build, ids_for
from dam_compile import load_profile, save_profile

PCL = 16
OPTIONS = {"kernel": "reference", "min_seq_len": 0, "block_size": 16, "inner_backend": "aot_eager", "dense_layers": 0}


def samples(n=3, batch=2, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (batch, length), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def llama_and_profile():
    model = build("llama")
    # The paper's method (no held-out check): the tests below compare with the patterns' own plans.
    return model, calibrate(model, samples(), pcl=PCL, min_recall=None, progress=False)


def test_profile_covers_every_attention_module_per_query_head(llama_and_profile):
    model, profile = llama_and_profile
    assert list(profile.modules) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    for module in profile.modules.values():
        assert module.mean_attention.shape == (4, PCL, PCL)  # 4 query heads (2 KV heads): per query head
        assert module.is_causal
        upper = torch.ones(PCL, PCL, dtype=torch.bool).triu(1)
        assert (module.mean_attention[:, upper] == 0).all()
        rows = module.mean_attention.sum(-1)
        assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)  # each row a mean of distributions


def test_mean_is_per_cell_over_valid_positions_and_realigns_padding():
    """A left-padded copy of a sample counts like the sample itself: cell (i, j) is the i-th and j-th real token."""
    model = build("llama")
    ids = torch.randint(1, VOCAB, (1, 12), generator=torch.Generator().manual_seed(5))
    alone = calibrate(model, [ids], pcl=PCL, progress=False)
    padded = {"input_ids": torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1),
              "attention_mask": torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], 1)}
    with_pad = calibrate(model, [padded], pcl=PCL, progress=False)
    for name in alone.modules:
        a, b = alone.modules[name].mean_attention, with_pad.modules[name].mean_attention
        assert rel_err(b[:, :12, :12], a[:, :12, :12]) < 1e-4
        assert (b[:, 12:] == 0).all()  # never-seen cells stay 0 (count + 1e-10 in the denominator)


def test_profile_round_trip_and_mismatch(tmp_path, llama_and_profile):
    model, profile = llama_and_profile
    path = save_profile(profile, tmp_path / "llama.safetensors")
    loaded = load_profile(path, model=model)
    assert (loaded.pcl, loaded.tau, loaded.mu, loaded.box_cox_lambda) == (PCL, 0.3, 0.8, 0.5)
    for name, module in profile.modules.items():
        other = loaded.modules[name]
        assert torch.equal(other.mean_attention, module.mean_attention)
        assert torch.equal(other.patterns.diagonals, module.patterns.diagonals)
        assert torch.equal(other.patterns.corner, module.patterns.corner)
    with pytest.raises(ProfileMismatchError, match="calibrated on a model"):
        load_profile(path, model=build("qwen2"))
    with pytest.raises(ValueError, match="not a DAM profile"):
        (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
        load_profile(tmp_path / "junk.safetensors")


def test_profile_for_another_model_raises_at_compile(llama_and_profile):
    _, profile = llama_and_profile
    gpt2 = build("gpt2")
    with torch.no_grad(), pytest.raises(Exception, match="calibrated for another model"):
        torch.compile(gpt2, backend="dam", options={**OPTIONS, "profile": profile})(ids_for("gpt2"))


class PlansInCallOrder(TorchFunctionMode):
    """Eager oracle: the i-th SDPA call attends with the i-th calibrated plan through the PyTorch reference."""

    def __init__(self, patterns):
        super().__init__()
        self.patterns, self.calls = patterns, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        a = bind_sdpa_args(args, kwargs)
        p = self.patterns[self.calls]
        self.calls += 1
        n = a["query"].shape[-2]
        plan = pattern_plan(p.diagonals, p.columns, p.corner, n, n, 16, a["is_causal"])
        return block_sparse_attention_reference(
            a["query"], a["key"], a["value"], plan, attn_mask=a["attn_mask"], scale=a["scale"],
            is_causal=a["is_causal"], enable_gqa=a["enable_gqa"])


@pytest.mark.parametrize("inner_backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_with_profile_equals_reference_with_the_extended_mask(tmp_path, llama_and_profile, inner_backend):
    model, profile = llama_and_profile
    path = save_profile(profile, tmp_path / "p.safetensors")
    x = ids_for("llama", n=70)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend="dam", options={**OPTIONS, "inner_backend": inner_backend,
                                                            "profile": str(path)})(x).logits
        with PlansInCallOrder([m.patterns for m in profile.modules.values()]):
            expected = model(x).logits
        dense = model(x).logits
    report = dam_compile.graph_reports()[-1]
    assert [s.mask_source for s in report.sites] == ["calibrated", "calibrated"]
    assert rel_err(out, expected) < 1e-5
    assert rel_err(out, dense) > 1e-3  # the profile really is sparse at 70 tokens (PCL 16)


def test_calibrate_rejects_bad_arguments():
    model = build("llama")
    with pytest.raises(ValueError, match="pcl"):
        calibrate(model, samples(), pcl=1)
    with pytest.raises(ValueError, match="mu"):
        calibrate(model, samples(), mu=0.0)
    with pytest.raises(ValueError, match="samples is empty"):
        calibrate(model, [], pcl=PCL, progress=False)
    with pytest.raises(ValueError, match="scaled_dot_product_attention"):
        calibrate(torch.nn.Embedding(VOCAB, 8), samples(), pcl=PCL, progress=False)
