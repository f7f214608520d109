"""``DAMProfile`` (calibration/profile.py): patterns derived from mean attention maps, other thresholds on the same
maps, the dynamic-head split, a tensor-parallel rank's slice, block density, module lookup and the model
fingerprint. The file format: test_profile_file.py; the backend slicing a whole profile for a rank's graph:
tests/test_tensor_parallel.py."""

import dataclasses

import pytest
import torch

import dam_compile
from dam_compile import DAMProfile, ProfileMismatchError
from dam_compile.calibration.profile import model_fingerprint
from dam_compile.passes.profile_protocol import ProfileMismatchError as PassesProfileMismatchError
from dam_compile.plan.block_plan import PATTERN_PAD
from dam_compile.plan.dam_patterns import extended_mask

from dam_compile import save_profile

PCL = 16
HEADS = 4
SINK, LOCAL, PREVIOUS, EVERYTHING = range(HEADS)


def whole_profile() -> DAMProfile:
    g = torch.Generator().manual_seed(0)
    maps = {name: torch.rand(HEADS, PCL, PCL, generator=g).tril() for name in ("layers.0.attn", "layers.1.attn")}
    profile = DAMProfile.from_mean_attention(maps, {n: True for n in maps}, box_cox_lambda=0.5, tau=0.3, mu=0.5,
                                             model_fingerprint="x", samples=1)
    return profile.with_dynamic_heads({"layers.1.attn": [1, 2]},
                                      holdout_recall={"layers.1.attn": torch.tensor([0.9, 0.1, 0.2, 0.8])})


def planted_maps(pcl: int = PCL, seed: int = 0) -> torch.Tensor:
    """Mean attention ``[4, pcl, pcl]`` of four heads whose kind is known: a sink (key 0), local (itself), the
    previous token, and every key; over a little noise, each row a distribution."""
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(HEADS, pcl, pcl, generator=g).tril() * 1e-3
    r = torch.arange(pcl)
    maps[SINK, :, 0] += 1
    maps[LOCAL, r, r] += 1
    maps[PREVIOUS, r[1:], r[:-1]] += 1
    maps[PREVIOUS, 0, 0] += 1
    maps[EVERYTHING] += torch.ones(pcl, pcl).tril()
    return maps / maps.sum(-1, keepdim=True)


def planted_profile(**kw) -> DAMProfile:
    args = dict(box_cox_lambda=0.5, tau=0.3, mu=0.8, model_fingerprint="fp", samples=2)
    return DAMProfile.from_mean_attention({"layers.0.attn": planted_maps()}, {"layers.0.attn": True}, **{**args, **kw})


def kept(values: torch.Tensor) -> list[set[int]]:
    """Per head, the kept entries of a padded pattern list."""
    return [set(row[row != PATTERN_PAD].tolist()) for row in values]


# ---- from_mean_attention -------------------------------------------------------------------------------------------

def test_patterns_from_mean_attention_are_the_heads_planted_kinds():
    """The sink keeps column 0, the local head diagonal 0, the previous-token head diagonal 1, the broad head every
    diagonal and column. (A one-entry diagonal or column inside a kept pattern passes too: diagonal 15 is the
    sink's cell (15, 0), column 15 the local head's cell (15, 15).)"""
    module = planted_profile().modules["layers.0.attn"]
    assert kept(module.patterns.diagonals) == [{15}, {0}, {1}, set(range(PCL))]
    assert kept(module.patterns.columns) == [{0}, {15}, set(), set(range(PCL))]
    corner = module.patterns.corner
    r = torch.arange(PCL)
    assert corner[SINK, :, 0].all() and corner[LOCAL, r, r].all() and corner[EVERYTHING].equal(
        torch.ones(PCL, PCL, dtype=torch.bool).tril())
    # Extended past the PCL: the previous-token head sees exactly key i - 1 (row 0 its corner's key 0).
    previous = extended_mask(module.patterns, 64, 64, True)[PREVIOUS]
    expected = torch.zeros(64, 64, dtype=torch.bool)
    expected[torch.arange(1, 64), torch.arange(63)] = True
    expected[0, 0] = True
    assert torch.equal(previous, expected)


def test_from_mean_attention_keeps_the_maps_and_metadata():
    maps = planted_maps().double()
    profile = DAMProfile.from_mean_attention({"a": maps, "b": maps[:2]}, {"a": True, "b": False}, box_cox_lambda=0.25,
                                             tau=0.4, mu=0.7, model_fingerprint="fp", samples=5)
    assert (profile.pcl, profile.box_cox_lambda, profile.tau, profile.mu, profile.samples) == (PCL, 0.25, 0.4, 0.7, 5)
    assert (profile.min_recall, profile.holdout_samples, profile.head_shard) == (None, 0, None)
    a, b = profile.modules["a"], profile.modules["b"]
    assert a.mean_attention.dtype == torch.float32 and a.mean_attention.device.type == "cpu"
    assert torch.allclose(a.mean_attention.double(), maps, rtol=1e-6)
    assert (a.heads, b.heads, a.is_causal, b.is_causal) == (4, 2, True, False)
    assert not a.dynamic_heads.any() and a.holdout_recall.isnan().all()  # no split until with_dynamic_heads


def test_from_mean_attention_rejects_empty_and_mixed_lengths():
    args = dict(box_cox_lambda=0.5, tau=0.3, mu=0.8, model_fingerprint="x", samples=1)
    with pytest.raises(ValueError, match="mean_attention is empty"):
        DAMProfile.from_mean_attention({}, {}, **args)
    with pytest.raises(ValueError, match="share one PCL, got \\[8, 16\\]"):
        DAMProfile.from_mean_attention({"a": planted_maps(), "b": planted_maps(8)}, {"a": True, "b": True}, **args)


# ---- rethreshold ---------------------------------------------------------------------------------------------------

def test_rethreshold_with_the_same_thresholds_gives_the_same_patterns_and_a_higher_tau_keeps_less():
    profile = planted_profile()
    same = profile.rethreshold()
    for field in ("diagonals", "columns", "corner"):
        assert torch.equal(getattr(same.modules["layers.0.attn"].patterns, field),
                           getattr(profile.modules["layers.0.attn"].patterns, field))
    loose, tight = profile.rethreshold(tau=0.05), profile.rethreshold(tau=0.9)
    assert (loose.tau, tight.tau, tight.mu, tight.box_cox_lambda) == (0.05, 0.9, 0.8, 0.5)
    loose_corner = loose.modules["layers.0.attn"].patterns.corner
    tight_corner = tight.modules["layers.0.attn"].patterns.corner
    assert (tight_corner & ~loose_corner).sum() == 0 and tight_corner.sum() < loose_corner.sum()
    assert torch.equal(tight.modules["layers.0.attn"].mean_attention, profile.modules["layers.0.attn"].mean_attention)


def test_rethreshold_keeps_the_split():
    original = planted_profile().with_dynamic_heads(
        {"layers.0.attn": [2]}, holdout_recall={"layers.0.attn": torch.linspace(0.1, 0.9, 4)}, min_recall=0.5,
        holdout_samples=2)
    other = original.rethreshold(tau=0.1)
    assert other.tau == 0.1 and (other.min_recall, other.holdout_samples) == (0.5, 2)
    assert other.modules["layers.0.attn"].dynamic_heads.tolist() == [False, False, True, False]
    assert torch.equal(other.modules["layers.0.attn"].holdout_recall, torch.linspace(0.1, 0.9, 4))


# ---- with_dynamic_heads --------------------------------------------------------------------------------------------

def test_with_dynamic_heads_takes_indices_or_a_mask_and_leaves_the_original_alone():
    profile = whole_profile()
    by_index = profile.with_dynamic_heads({"layers.0.attn": [3, 0]})
    by_mask = profile.with_dynamic_heads({"layers.0.attn": torch.tensor([True, False, False, True])})
    for made in (by_index, by_mask):
        assert made.modules["layers.0.attn"].dynamic_heads.tolist() == [True, False, False, True]
        assert made.modules["layers.1.attn"].dynamic_heads.tolist() == [False, True, True, False]  # not listed: kept
        assert made.modules["layers.1.attn"].holdout_recall.tolist() == pytest.approx([0.9, 0.1, 0.2, 0.8])
    assert not profile.modules["layers.0.attn"].dynamic_heads.any()
    cleared = profile.with_dynamic_heads({"layers.1.attn": []})
    assert not cleared.modules["layers.1.attn"].dynamic_heads.any()
    assert cleared.dynamic_summary() == {"dynamic_heads": {}, "dynamic_head_count": "0 of 8"}


@pytest.mark.parametrize(
    "dynamic, recall, match",
    [({"nope": [0]}, None, "dynamic_heads names modules this profile lacks: nope"),
     ({}, {"nope": torch.zeros(4)}, "holdout_recall names modules this profile lacks: nope"),
     ({"layers.0.attn": [4]}, None, "dynamic_heads of layers.0.attn: .*lie in \\[0, 4\\)"),
     ({"layers.0.attn": [-1]}, None, "lie in \\[0, 4\\)"),
     ({"layers.0.attn": torch.ones(3, dtype=torch.bool)}, None, "dynamic_heads of layers.0.attn must have 4 entries"),
     ({"layers.0.attn": torch.ones(4, dtype=torch.uint8)}, None, "must be bool"),
     ({}, {"layers.0.attn": torch.zeros(3)}, "holdout_recall must be a \\[4\\] tensor")],
)
def test_with_dynamic_heads_rejects_bad_arguments_naming_them(dynamic, recall, match):
    with pytest.raises(ValueError, match=match):
        whole_profile().with_dynamic_heads(dynamic, holdout_recall=recall)


# ---- shard_heads ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2, 4])
def test_the_ranks_slices_put_together_are_the_whole_profile(world):
    whole = whole_profile()
    shards = [whole.shard_heads(rank, world) for rank in range(world)]
    for name, module in whole.modules.items():
        parts = [s.modules[name] for s in shards]
        assert all(p.heads == HEADS // world for p in parts)
        for field in ("mean_attention", "dynamic_heads"):
            assert torch.equal(torch.cat([getattr(p, field) for p in parts]), getattr(module, field))
        assert torch.equal(torch.cat([p.holdout_recall for p in parts]).isnan(), module.holdout_recall.isnan())
        for field in ("diagonals", "columns", "corner"):
            assert torch.equal(torch.cat([getattr(p.patterns, field) for p in parts]),
                               getattr(module.patterns, field))
    assert [s.head_shard for s in shards] == [(rank, world) for rank in range(world)]
    assert whole.head_shard is None  # the whole profile is left as it was
    # Rank 1 of 2 runs global heads 2 and 3: of layer 1's dynamic heads (1, 2), its local head 0.
    assert whole.shard_heads(1, 2).modules["layers.1.attn"].dynamic_heads.tolist() == [True, False]


@pytest.mark.parametrize("rank, world, match", [
    (2, 2, "rank must be an int in \\[0, 2\\)"), (-1, 2, "rank"), (0, 0, "world_size"), (0, 3, "does not divide"),
    (True, 2, "rank"), (0, 2.0, "world_size"),
])
def test_bad_shards_raise_naming_the_argument(rank, world, match):
    with pytest.raises(ValueError, match=match):
        whole_profile().shard_heads(rank, world)


def test_a_slice_is_not_sliced_again_nor_saved(tmp_path):
    part = whole_profile().shard_heads(0, 2)
    with pytest.raises(ValueError, match="already"):
        part.shard_heads(0, 2)
    with pytest.raises(ValueError, match="save the whole profile"):
        save_profile(part, tmp_path / "p.safetensors")


def test_the_plan_cache_tells_a_head_slice_from_the_whole():
    """Rank 0's slice shares its storage (and data pointer) with the whole profile's patterns: a plan cached
    for the whole must not be returned for the slice."""
    from dam_compile.plan.pattern_plan import cached_pattern_plan

    patterns = whole_profile().modules["layers.0.attn"].patterns  # a fresh profile: nothing of it is cached yet
    first = cached_pattern_plan(patterns.diagonals, patterns.columns, patterns.corner, 64, 64, 16, True)
    head_slice = (patterns.diagonals[:2], patterns.columns[:2], patterns.corner[:2])
    assert head_slice[0].data_ptr() == patterns.diagonals.data_ptr()
    second = cached_pattern_plan(*head_slice, 64, 64, 16, True)
    assert first.kv_num_blocks.shape[1] == HEADS and second.kv_num_blocks.shape[1] == 2
    assert torch.equal(second.kv_num_blocks, first.kv_num_blocks[:, :2])


# ---- block_density -------------------------------------------------------------------------------------------------

def density_by_hand(profile: DAMProfile, name: str, length: int, block: int) -> torch.Tensor:
    """float64 ``[H]``: key blocks holding any token the extended mask allows, over the causal-visible blocks."""
    module = profile.modules[name]
    mask = extended_mask(module.patterns, length, length, module.is_causal)
    nb = -(-length // block)
    padded = torch.nn.functional.pad(mask, (0, nb * block - length, 0, nb * block - length))
    kept = padded.unflatten(1, (nb, block)).unflatten(3, (nb, block)).any(4).any(2)
    return kept.sum((-1, -2)).double() / (nb * (nb + 1) // 2)


@pytest.mark.parametrize("length, block", [(16, 16), (100, 16), (200, 32), (64, 64)])
def test_block_density_counts_the_blocks_the_extended_mask_touches(length, block):
    profile = planted_profile()
    density = profile.block_density(length, block)["layers.0.attn"]
    assert density.shape == (HEADS,)
    assert torch.allclose(density.double(), density_by_hand(profile, "layers.0.attn", length, block), atol=1e-6)
    assert (density <= density[EVERYTHING]).all() and (density > 0).all()


def test_block_density_of_random_profiles_matches_the_definition():
    g = torch.Generator().manual_seed(4)
    maps = {f"l{i}": torch.rand(HEADS, PCL, PCL, generator=g).pow(4).tril() for i in range(2)}
    profile = DAMProfile.from_mean_attention(maps, {n: True for n in maps}, box_cox_lambda=0.5, tau=0.3, mu=0.5,
                                             model_fingerprint="x", samples=1)
    for name, density in profile.block_density(130, 16).items():
        assert torch.allclose(density.double(), density_by_hand(profile, name, 130, 16), atol=1e-6)


# ---- lookup and fingerprint ----------------------------------------------------------------------------------------

def test_find_module_matches_a_submodule_or_a_wrapper_and_refuses_ambiguity():
    profile = whole_profile()
    assert profile.find_module("layers.0.attn") == "layers.0.attn"
    assert profile.find_module("model.layers.0.attn") == "layers.0.attn"  # a wrapper around the calibrated model
    assert profile.find_module("0.attn") == "layers.0.attn"  # compiled from a submodule
    assert profile.find_module("attn") is None  # both entries end with it
    assert profile.find_module("layers.2.attn") is None
    patterns, dynamic = profile.patterns_for("model.layers.1.attn", "cpu")
    assert torch.equal(patterns.diagonals, profile.modules["layers.1.attn"].patterns.diagonals)
    assert dynamic.tolist() == [False, True, True, False]
    assert profile.patterns_on("layers.1.attn", "cpu") is patterns  # copied to a device once
    with pytest.raises(ValueError, match="no entry for module 'layers.2.attn'"):
        profile.patterns_for("layers.2.attn", "cpu")


def test_fingerprint_tells_architectures_apart_and_check_model_raises():
    torch.manual_seed(0)
    a, same_shapes, other = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4), torch.nn.Linear(8, 5)
    assert model_fingerprint(a) == model_fingerprint(same_shapes)  # weights do not count
    assert model_fingerprint(a) != model_fingerprint(other)
    assert model_fingerprint(a) != model_fingerprint(torch.nn.Sequential(torch.nn.Linear(8, 4)))
    profile = dataclasses.replace(planted_profile(), model_fingerprint=model_fingerprint(a))
    profile.check_model(same_shapes)
    with pytest.raises(ProfileMismatchError, match="calibrated on a model .* but Linear has"):
        profile.check_model(other)


class HFLike(torch.nn.Module):
    def __init__(self, **config):
        super().__init__()
        self.config = type("Config", (), {"to_dict": lambda _self: dict(config)})()


def test_a_hf_models_fingerprint_reads_only_the_structural_config_fields():
    base = dict(model_type="llama", hidden_size=64, num_attention_heads=4, torch_dtype="float32")
    assert model_fingerprint(HFLike(**base)) == model_fingerprint(HFLike(**{**base, "torch_dtype": "bfloat16"}))
    assert model_fingerprint(HFLike(**base)) != model_fingerprint(HFLike(**{**base, "num_attention_heads": 8}))


def test_profile_mismatch_error_lives_below_the_face():
    assert dam_compile.ProfileMismatchError is ProfileMismatchError is PassesProfileMismatchError
