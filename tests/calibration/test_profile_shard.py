"""A calibrated profile sliced to a tensor-parallel rank's heads (``DAMProfile.shard_heads``), and what the
backend does with a whole profile when the graph has a rank's heads. Two real ranks: tests/test_tensor_parallel.py."""

import pytest
import torch

from dam_compile import DAMProfile, ProfileMismatchError
from dam_compile.tensor_parallel import profile_for_graph

from dam_testing import capture_graph, sdpa
from dam_compile import save_profile

PCL = 16
HEADS = 4


def whole_profile() -> DAMProfile:
    g = torch.Generator().manual_seed(0)
    maps = {name: torch.rand(HEADS, PCL, PCL, generator=g).tril() for name in ("layers.0.attn", "layers.1.attn")}
    profile = DAMProfile.from_mean_attention(maps, {n: True for n in maps}, box_cox_lambda=0.5, tau=0.3, mu=0.5,
                                             model_fingerprint="x", samples=1)
    return profile.with_dynamic_heads({"layers.1.attn": [1, 2]},
                                      holdout_recall={"layers.1.attn": torch.tensor([0.9, 0.1, 0.2, 0.8])})


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
    (True, 2, "rank"),
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


class Layers(torch.nn.Module):
    """``layers.{0,1}.attn``: what the profile above was made for, with ``heads`` query heads each."""

    def __init__(self, heads: int):
        super().__init__()
        self.layers = torch.nn.ModuleList(Block(heads) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class Block(torch.nn.Module):
    def __init__(self, heads: int):
        super().__init__()
        self.attn = Attention(heads)

    def forward(self, x):
        return self.attn(x)


class Attention(torch.nn.Module):
    def __init__(self, heads: int):
        super().__init__()
        self.heads = heads

    def forward(self, x):
        q = x.unflatten(-1, (self.heads, -1)).transpose(1, 2)
        return sdpa(q, q, q, is_causal=True).transpose(1, 2).flatten(-2)


def test_without_a_process_group_the_profile_is_used_as_given():
    (gm,) = capture_graph(Layers(HEADS // 2), torch.randn(1, 32, 16))
    whole = whole_profile()
    assert profile_for_graph(whole, gm) is whole


def test_a_rank_sized_graph_without_a_process_group_names_shard_heads():
    whole = whole_profile()
    options = {"kernel": "reference", "min_seq_len": 0, "block_size": 16, "inner_backend": "aot_eager",
               "profile": whole, "dense_layers": 0}
    with torch.no_grad(), pytest.raises(Exception, match="shard_heads\\(tp_rank, 2\\)") as err:
        torch.compile(Layers(HEADS // 2), backend="dam", options=options)(torch.randn(1, 32, 16))
    assert "ProfileMismatchError" in str(err.value) or isinstance(err.value, ProfileMismatchError)


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
