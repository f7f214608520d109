"""``answer_check`` (answer_check.py): a profile's next-token predictions against full attention's. The planted
model's heads are known (tests/planted_heads.py): a profile that keeps every key must keep its answers, one that
keeps only each token itself loses them; the KL and top-1 agreement against float64 numbers from logits computed
here over the profile's extended masks."""

import types

import pytest
import torch

import dam_compile
from dam_compile.answer_check import MAX_KL, MIN_TOP1, AnswerCheck, answer_check
from dam_compile.calibration.profile import DAMProfile
from dam_compile.module_stack import AttentionCallMode
from dam_compile.plan.dam_patterns import extended_mask

from dam_testing import dense_oracle
from hf_models import build, ids_for
from planted_heads import HEADS, PlantedModel, needle_samples

L = 48

class LM(torch.nn.Module):
    """The planted model as a causal LM: ``.logits``; its attention module is ``layers.0.attn``."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([PlantedModel()])

    def forward(self, ids):
        return types.SimpleNamespace(logits=self.layers[0](ids))


def profile_of(mean: torch.Tensor) -> DAMProfile:
    return DAMProfile.from_mean_attention({"attn": mean}, {"attn": True}, box_cox_lambda=0.5, tau=0.3, mu=0.8,
                                          model_fingerprint="x", samples=1)


def keep_everything(pcl=L) -> DAMProfile:
    """Every causal cell at the PCL: the extended mask at ``pcl`` tokens is full causal attention."""
    profile = profile_of(torch.ones(HEADS, pcl, pcl).tril())
    assert extended_mask(profile.modules["attn"].patterns, pcl, pcl, True).equal(
        torch.ones(HEADS, pcl, pcl, dtype=torch.bool).tril().expand(HEADS, -1, -1))
    return profile


def keep_only_itself(pcl=L) -> DAMProfile:
    """Each query's own key alone (diagonal 0): the sink, previous-token and retrieval heads lose their key."""
    return profile_of(torch.eye(pcl).expand(HEADS, pcl, pcl).clone())


def ids():
    return needle_samples(1, L, after=4, seed=3)[0]


class ExtendedMaskOracle(AttentionCallMode):
    """Every call of the profile's module over the extended mask of its patterns, in float64."""

    def __init__(self, model, profile):
        super().__init__(model)
        self.profile = profile

    def on_attention(self, name, a):
        q = a["query"]
        patterns = self.profile.modules[self.profile.find_module(name)].patterns
        allowed = extended_mask(patterns, q.shape[-2], q.shape[-2], True)
        return dense_oracle(q, a["key"], a["value"], allowed, scale=a["scale"]).to(q.dtype)


def check_by_hand(model, profile, x) -> tuple[float, float]:
    """KL(full || profile) per position and the top-1 agreement over the second half, in float64."""
    half = x.shape[1] // 2
    with torch.no_grad():
        full = model(x).logits[0, half:].double().log_softmax(-1)
        with ExtendedMaskOracle(model, profile):
            ours = model(x).logits[0, half:].double().log_softmax(-1)
    kl = float((full.exp() * (full - ours)).sum(-1).mean())
    return kl, float((full.argmax(-1) == ours.argmax(-1)).double().mean())


def test_the_limits():
    assert not AnswerCheck(kl=MAX_KL, top1=MIN_TOP1, positions=8).loses_answers
    assert AnswerCheck(kl=MAX_KL * 1.01, top1=1.0, positions=8).loses_answers
    assert AnswerCheck(kl=0.0, top1=MIN_TOP1 - 0.01, positions=8).loses_answers


def test_a_profile_that_keeps_every_key_keeps_the_answers():
    check = answer_check(LM().eval(), keep_everything(), ids(), dense_layers=0)
    assert check.positions == L // 2
    assert check.kl == pytest.approx(0.0, abs=1e-6) and check.top1 == 1.0 and not check.loses_answers


def test_a_profile_that_drops_the_needed_keys_is_flagged():
    model = LM().eval()
    check = answer_check(model, keep_only_itself(), ids(), dense_layers=0)
    assert check.loses_answers and check.kl > MAX_KL and check.positions == L // 2
    kl, _ = check_by_hand(model, keep_only_itself(), ids())
    assert kl > MAX_KL  # what the patterns really do loses the answers too


@pytest.mark.parametrize("profile", [keep_only_itself, lambda: keep_everything().rethreshold(tau=0.7)],
                         ids=["itself", "rethresholded"])
def test_kl_and_top1_are_those_of_the_profiles_extended_masks(profile):
    model, x = LM().eval(), ids()
    check = answer_check(model, profile(), x, dense_layers=0)
    kl, top1 = check_by_hand(model, profile(), x)
    assert check.kl == pytest.approx(kl, rel=1e-4, abs=1e-7) and check.top1 == pytest.approx(top1)


def test_the_first_dense_layers_stay_full_attention():
    """By default (dense_layers=1, as the backend) and when asked: layers.0.attn keeps full attention."""
    for dense_layers in (None, 1):
        check = answer_check(LM().eval(), keep_only_itself(), ids(), dense_layers=dense_layers)
        assert (check.kl, check.top1, check.loses_answers) == (0.0, 1.0, False)


def test_the_model_is_left_as_it_was_and_bad_inputs_are_refused():
    model = LM().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    answer_check(model, keep_only_itself(), ids(), dense_layers=0)
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    for bad in (ids()[0], ids().expand(2, -1), ids()[:, :3]):
        with pytest.raises(ValueError, match="input_ids must be one sequence"):
            answer_check(model, keep_only_itself(), bad)


def test_answer_check_of_a_profile_that_keeps_every_key_is_full_attention():
    """A tiny HF Llama (grouped heads, ``.logits``) with a calibrated profile."""
    model = build("llama")
    x = ids_for("llama", n=256)
    profile = dam_compile.calibrate(model, [x], pcl=16, min_recall=None, progress=False)
    check = answer_check(model, profile, x, dense_layers=len(profile.modules))  # every layer dense: exact
    assert check.kl == pytest.approx(0.0, abs=1e-6) and check.top1 == 1.0 and not check.loses_answers
    sparse = answer_check(model, profile, x, dense_layers=0)  # PCL 16 patterns over 256 tokens drop keys
    assert sparse.kl > 1e-6 and sparse.positions == 128
    with pytest.raises(ValueError, match="input_ids"):
        answer_check(model, profile, x[0])
