"""The profile file (calibration/profile_file.py): version 2 keeps the dynamic-head split, version 1 still loads, a
damaged file names what is wrong. The profile itself: test_profile.py."""

import json

import pytest
import torch
from safetensors.torch import save_file

from dam_compile import DAMProfile
from dam_compile.calibration.profile_file import FORMAT, VERSION

from dam_compile import load_profile, save_profile

PCL = 8


def profile(heads=(4, 4), dynamic=None) -> DAMProfile:
    g = torch.Generator().manual_seed(0)
    maps = {f"layers.{i}.attn": torch.rand(h, PCL, PCL, generator=g).tril() for i, h in enumerate(heads)}
    made = DAMProfile.from_mean_attention(maps, {n: True for n in maps}, box_cox_lambda=0.5, tau=0.3, mu=0.8,
                                          model_fingerprint="abc", samples=3)
    return made if dynamic is None else made.with_dynamic_heads(
        dynamic, holdout_recall={n: torch.linspace(0.1, 0.9, h) for n, h in zip(maps, heads)}, min_recall=0.5,
        holdout_samples=2)


def test_round_trip_keeps_the_split(tmp_path):
    original = profile(dynamic={"layers.0.attn": [1, 3]})
    loaded = load_profile(save_profile(original, tmp_path / "p.safetensors"))
    assert (loaded.min_recall, loaded.holdout_samples, loaded.samples) == (0.5, 2, 3)
    for name, module in original.modules.items():
        other = loaded.modules[name]
        assert torch.equal(other.dynamic_heads, module.dynamic_heads)
        assert torch.allclose(other.holdout_recall, module.holdout_recall, equal_nan=True)
        assert torch.equal(other.patterns.diagonals, module.patterns.diagonals)
    assert loaded.modules["layers.0.attn"].dynamic_heads.tolist() == [False, True, False, True]
    assert not loaded.modules["layers.1.attn"].dynamic_heads.any()
    assert loaded.dynamic_summary() == {"dynamic_heads": {"layers.0.attn": [1, 3]}, "dynamic_head_count": "2 of 8"}


def write_v1(path, source: DAMProfile, version="1"):
    """A file as version 1 wrote it: no dynamic heads, no held-out recall."""
    tensors, listed = {}, []
    for name, m in source.modules.items():
        tensors.update({f"{name}/mean_attention": m.mean_attention, f"{name}/diagonals": m.patterns.diagonals,
                        f"{name}/columns": m.patterns.columns, f"{name}/true_mask": m.patterns.corner.to(torch.uint8)})
        listed.append({"name": name, "heads": m.heads, "is_causal": m.is_causal})
    meta = {"format": FORMAT, "version": version, "pcl": str(PCL), "box_cox_lambda": "0.5", "tau": "0.3", "mu": "0.8",
            "samples": "3", "model_fingerprint": "abc", "modules": json.dumps(listed)}
    save_file(tensors, str(path), metadata=meta)
    return path


def test_version_1_files_load_without_dynamic_heads(tmp_path):
    source = profile()
    loaded = load_profile(write_v1(tmp_path / "v1.safetensors", source))
    assert VERSION == 2 and (loaded.min_recall, loaded.holdout_samples) == (None, 0)
    for name, module in loaded.modules.items():
        assert not module.dynamic_heads.any() and module.holdout_recall.isnan().all()
        assert torch.equal(module.patterns.columns, source.modules[name].patterns.columns)


@pytest.mark.parametrize("version", ["3", "x"])
def test_unknown_versions_raise(tmp_path, version):
    with pytest.raises(ValueError, match="profile version"):
        load_profile(write_v1(tmp_path / "v.safetensors", profile(), version))


def test_a_damaged_file_names_what_is_wrong(tmp_path):
    path = save_profile(profile(dynamic={"layers.1.attn": [0]}), tmp_path / "p.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    missing = {k: v for k, v in tensors.items() if k != "layers.1.attn/dynamic_heads"}
    save_file(missing, str(tmp_path / "missing.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="layers.1.attn/dynamic_heads"):
        load_profile(tmp_path / "missing.safetensors")
    short = {**tensors, "layers.1.attn/dynamic_heads": torch.zeros(3, dtype=torch.uint8)}
    save_file(short, str(tmp_path / "short.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="dynamic_heads must be a \\[4\\]"):
        load_profile(tmp_path / "short.safetensors")
    listed = json.loads(meta["modules"])
    listed[0]["heads"] = 5
    save_file(tensors, str(tmp_path / "heads.safetensors"), metadata={**meta, "modules": json.dumps(listed)})
    with pytest.raises(ValueError, match="lists 5 heads"):
        load_profile(tmp_path / "heads.safetensors")
