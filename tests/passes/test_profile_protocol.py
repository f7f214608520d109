"""``passes/profile_protocol``: which entry of a calibrated profile a site uses (the profile's own lookup of the
site's module path), and ``ProfileMismatchError`` when that entry has another head count than the site."""

import dataclasses

import pytest
import torch

from dam_compile.passes.find_sdpa import find_sdpa_sites
from dam_compile.passes.profile_protocol import ProfileMismatchError, profile_entry

from dam_testing import AttentionLayers, capture_graph, meta, one_module_profile, sdpa_graph

ENTRY = "model.layers.1.self_attn"


def site_at(module_path, heads=4):
    (site,) = find_sdpa_sites(sdpa_graph(q=meta(1, heads, 64, 16), k=meta(1, heads, 64, 16), v=meta(1, heads, 64, 16)))
    return dataclasses.replace(site, module_path=module_path)


class Lookup:
    """A profile's ``find_module`` that records what it was asked."""

    def __init__(self, answer):
        self.answer, self.asked = answer, []

    def __call__(self, path):
        self.asked.append(path)
        return self.answer


def test_the_entry_is_the_profiles_answer_for_the_sites_module_path():
    profile, _ = one_module_profile(entry=ENTRY)
    profile.find_module = Lookup(ENTRY)  # e.g. a profile of the whole model for a graph of its decoder
    assert profile_entry(profile, site_at("layers.1.self_attn")) == ENTRY
    assert profile.find_module.asked == ["layers.1.self_attn"]


def test_no_entry_for_an_unknown_module_or_a_site_without_a_module():
    profile, _ = one_module_profile(entry=ENTRY)
    assert profile_entry(profile, site_at("model.layers.0.self_attn")) is None
    profile.find_module = Lookup(ENTRY)
    assert profile_entry(profile, site_at("")) is None and profile.find_module.asked == []  # never matched by ""


def test_the_module_paths_of_a_dynamo_graph_find_their_entries():
    profile, _ = one_module_profile(entry="layers.1.self_attn")
    (gm,) = capture_graph(AttentionLayers(2), *(torch.randn(1, 4, 32, 16) for _ in range(3)))
    assert [profile_entry(profile, site) for site in find_sdpa_sites(gm.graph)] == [None, "layers.1.self_attn"]


def test_an_entry_of_another_head_count_is_a_mismatch():
    profile, _ = one_module_profile(heads=4, entry=ENTRY)
    with pytest.raises(ProfileMismatchError, match=f"the profile's {ENTRY} has 4 query heads but the graph's "
                                                   f"attention at {ENTRY} has 3: the profile was calibrated for"):
        profile_entry(profile, site_at(ENTRY, heads=3))
    with pytest.raises(ProfileMismatchError, match="has 8: the profile was calibrated for another model"):
        profile_entry(profile, site_at(ENTRY, heads=8))


def test_a_tensor_parallel_slice_of_the_heads_says_how_to_shard_the_profile():
    profile, _ = one_module_profile(heads=4, entry=ENTRY)
    with pytest.raises(ProfileMismatchError, match=r"pass profile.shard_heads\(tp_rank, 2\)"):
        profile_entry(profile, site_at(ENTRY, heads=2))


def test_a_mismatch_is_a_value_error():
    """Callers that catch ValueError for bad options catch it too."""
    assert issubclass(ProfileMismatchError, ValueError)
