"""calibrate() finds the heads no fixed pattern serves (retrieval heads) on held-out samples, and marks them
dynamic; min_recall=None keeps the paper's method."""

import pytest
import torch

from dam_compile import calibrate
from dam_compile.calibration.holdout import split_holdout

from planted_heads import RETRIEVAL_HEAD, PlantedModel, needle_samples

PCL = 32


@pytest.fixture(scope="module")
def model():
    return PlantedModel().eval()


@pytest.mark.parametrize("holdout_len", [512, 4096])
def test_the_planted_retrieval_head_is_found(model, holdout_len):
    """Captured at 32 tokens the needle is never seen; held out at 512 and 4096 tokens (query rows chunked) the
    retrieval head's pattern keeps little of its mass, the position-fixed heads keep all of theirs."""
    samples = needle_samples(4, holdout_len, after=PCL * 2)
    profile = calibrate(model, samples, pcl=PCL, holdout_len=holdout_len, progress=False)
    module = profile.modules["attn"]
    expected = torch.zeros(4, dtype=torch.bool)
    expected[RETRIEVAL_HEAD] = True
    assert torch.equal(module.dynamic_heads, expected)
    recall = module.holdout_recall
    assert (recall[~expected] > 0.99).all() and recall[RETRIEVAL_HEAD] < 0.5
    assert (profile.samples, profile.holdout_samples, profile.min_recall) == (3, 1, 0.5)


def test_min_recall_none_or_zero_keeps_the_paper_method(model):
    samples = needle_samples(4, 256, after=PCL * 2)
    for off in (None, 0.0):
        profile = calibrate(model, samples, pcl=PCL, min_recall=off, progress=False)
        module = profile.modules["attn"]
        assert not module.dynamic_heads.any() and module.holdout_recall.isnan().all()
        assert (profile.samples, profile.holdout_samples, profile.min_recall) == (4, 0, None)


def test_min_recall_sets_the_split(model):
    """A threshold of 1 makes every head whose pattern misses any mass dynamic; the recall is the same."""
    samples = needle_samples(3, 256, after=PCL * 2)
    loose = calibrate(model, samples, pcl=PCL, progress=False).modules["attn"]
    strict = calibrate(model, samples, pcl=PCL, min_recall=1.0, progress=False).modules["attn"]
    assert torch.equal(loose.holdout_recall, strict.holdout_recall)
    assert torch.equal(strict.dynamic_heads, strict.holdout_recall < 1.0)
    assert strict.dynamic_heads.sum() >= loose.dynamic_heads.sum()


def test_explicit_holdout_samples_are_evaluated_and_all_samples_captured(model):
    capture = needle_samples(2, PCL, after=4)
    held = needle_samples(1, 1024, after=100, seed=7)
    profile = calibrate(model, capture, pcl=PCL, holdout=held, holdout_len=None, progress=False)
    assert (profile.samples, profile.holdout_samples) == (2, 1)
    assert profile.modules["attn"].dynamic_heads.tolist() == [False, False, False, True]


@pytest.mark.parametrize(
    "count, share, captured, held",
    [(1, 0.25, [0], [0]), (2, 0.25, [0], [1]), (4, 0.25, [0, 1, 2], [3]), (10, 0.3, list(range(7)), [7, 8, 9]),
     (3, 0.9, [0], [1, 2])],
)
def test_split_holdout(count, share, captured, held):
    assert split_holdout(list(range(count)), share) == (captured, held)
    assert split_holdout(list(range(count)), iter([9])) == (list(range(count)), [9])


@pytest.mark.parametrize(
    "kwargs, match",
    [({"min_recall": 1.5}, "min_recall"), ({"min_recall": "high"}, "min_recall"), ({"holdout": 1.0}, "holdout"),
     ({"holdout": 0.0}, "holdout"), ({"holdout": "file.txt"}, "holdout"), ({"holdout": []}, "holdout is empty"),
     ({"holdout_len": 1}, "holdout_len"), ({"holdout_len": 100.0}, "holdout_len")],
)
def test_bad_holdout_arguments_raise_naming_them(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        calibrate(model, needle_samples(2, 64, after=40), pcl=PCL, progress=False, **kwargs)
