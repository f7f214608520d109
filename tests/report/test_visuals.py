"""PNG heatmaps (report/visuals.py): a profile's per-module figures and density grid, and the measured block plans
of each site. Skipped without matplotlib (the ``viz`` extra), except the check that its absence is named."""

import struct
import sys

import pytest
import torch

from dam_compile.calibration.profile import DAMProfile
from dam_compile.report.site_measures import SiteMeasure
from dam_compile.report.visuals import plot_density_grid, plot_profile, plot_site_blocks

PCL = 16


@pytest.fixture
def matplotlib():
    return pytest.importorskip("matplotlib")


def png_size(path) -> tuple[int, int]:
    """(width, height) from the PNG header; fails unless the file is a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def profile(heads=(2, 3)) -> DAMProfile:
    """Modules whose names need cleaning for a file name, with different head counts."""
    g = torch.Generator().manual_seed(0)
    maps = {f"model/layers:{i} attn": torch.rand(h, PCL, PCL, generator=g).pow(3).tril() for i, h in enumerate(heads)}
    return DAMProfile.from_mean_attention(maps, {n: True for n in maps}, box_cox_lambda=0.5, tau=0.3, mu=0.5,
                                          model_fingerprint="x", samples=1)


def test_plot_profile_writes_a_figure_per_module_with_a_row_per_head_and_the_density_grid(matplotlib, tmp_path):
    files = plot_profile(profile(heads=(1, 2)), tmp_path / "out", length=64, block_size=16)
    assert [f.name for f in files] == ["model_layers_0_attn.png", "model_layers_1_attn.png", "density.png"]
    assert all(f.parent == tmp_path / "out" and f.is_file() for f in files)
    # figsize (9, 3 per head) at 80 dpi: one row of three panels per head
    assert png_size(files[0]) == (720, 240) and png_size(files[1]) == (720, 2 * 240)
    png_size(files[2])


def test_plot_profile_draws_long_masks_per_block_at_sixteen_pcls_by_default(matplotlib, tmp_path, monkeypatch):
    """Past TOKEN_LEVEL_MAX tokens the extended mask is drawn per block (the token mask is never built)."""
    import dam_compile.report.visuals as visuals

    seen = []
    real = DAMProfile.block_density
    monkeypatch.setattr(DAMProfile, "block_density", lambda self, length, block: seen.append(length) or
                        real(self, length, block))
    monkeypatch.setattr(visuals, "extended_mask", lambda *a: pytest.fail("token-level mask drawn at 2048 tokens"))
    long = DAMProfile.from_mean_attention({"a": torch.rand(1, 128, 128).tril()}, {"a": True}, box_cox_lambda=0.5,
                                          tau=0.3, mu=0.5, model_fingerprint="x", samples=1)
    files = plot_profile(long, tmp_path)
    assert seen == [16 * 128] and [f.name for f in files] == ["a.png", "density.png"]
    assert png_size(files[0]) == (720, 240)


def test_density_grid_takes_modules_of_different_head_counts(matplotlib, tmp_path):
    path = plot_density_grid({"a": torch.tensor([0.1, 0.9]), "b": torch.tensor([0.5, 0.5, 0.2, 1.0])},
                             tmp_path / "grid.png", 1024)
    assert path == tmp_path / "grid.png"
    width, height = png_size(path)
    assert width > 0 and height > 0


def measure(name: str, heads: int, recall: bool) -> SiteMeasure:
    blocks = torch.randint(0, 3, (heads, 4, 4), dtype=torch.int8, generator=torch.Generator().manual_seed(heads))
    return SiteMeasure(name, 64, 64, [0.5] * heads, [0.9] * heads if recall else None, "reference",
                       "kernel='reference'", blocks)


def test_site_blocks_draw_at_most_max_heads_eight_to_a_row(matplotlib, tmp_path):
    files = plot_site_blocks({"layers.0.attn": measure("layers.0.attn", 10, True), "": measure("", 3, False)},
                             tmp_path / "masks")
    assert [f.name for f in files] == ["layers.0.attn.png", "top_level.png"]  # the top-level module has no name
    assert png_size(files[0]) == (int(2.2 * 8 * 80), int(2.4 * 2 * 80))  # 10 heads: two rows of eight
    assert png_size(files[1]) == (int(2.2 * 3 * 80), int(2.4 * 80))
    (capped,) = plot_site_blocks({"a": measure("a", 10, True)}, tmp_path / "capped", max_heads=4)
    assert png_size(capped) == (int(2.2 * 4 * 80), int(2.4 * 80))


def test_without_matplotlib_the_extra_is_named_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"pip install 'dam-compile\[viz\]'"):
        plot_profile(profile(), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ImportError, match="matplotlib"):
        plot_site_blocks({"a": measure("a", 2, True)}, tmp_path / "masks")
