"""PNG heatmaps of DAM profiles, like the paper's figures (needs the ``viz`` extra: matplotlib).

Per attention module one figure, a row per head: the shifted Box-Cox map, the true mask at PCL, and the
extended mask at a longer length (token level when small, block level otherwise); plus one density grid
(modules x heads) of the extended plans.
"""

from __future__ import annotations

import os

import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dam_compile.plan.dam_patterns import extended_mask, shifted_box_cox
from dam_compile.plan.pattern_plan import pattern_block_tables
from dam_compile.plan.arith import cdiv
from dam_compile.plan.defaults import DEFAULT_BLOCK_SIZE

if TYPE_CHECKING:
    from dam_compile.calibration.profile import DAMProfile
    from .site_measures import SiteMeasure

TOKEN_LEVEL_MAX = 1024  # extended masks up to this length are drawn per token, longer ones per block


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install 'dam-compile[viz]'") from err
    return plt


def _file_name(module: str) -> str:
    return re.sub(r"[^\w.-]", "_", module) + ".png"


def plot_profile(profile: "DAMProfile", directory: str | os.PathLike, *, length: int | None = None,
                 block_size: int = DEFAULT_BLOCK_SIZE) -> list[Path]:
    """PNG heatmaps of a calibrated profile (needs the ``viz`` extra): per module ``<module>.png`` with the Box-Cox
    map, true mask and extended mask of every head, and ``density.png`` (modules x heads) at ``length`` (default
    ``16 * pcl``). Returns the paths written."""
    plt = _pyplot()
    length = length or 16 * profile.pcl
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, module in profile.modules.items():
        heads = module.heads
        fig, axes = plt.subplots(heads, 3, figsize=(9, 3 * heads), squeeze=False)
        amplified = shifted_box_cox(module.mean_attention, profile.box_cox_lambda)
        if length <= TOKEN_LEVEL_MAX:
            extended = extended_mask(module.patterns, length, length, module.is_causal)
            ext_title = f"extended mask, {length} tokens"
        else:
            partial, full = pattern_block_tables(
                module.patterns.diagonals, module.patterns.columns, module.patterns.corner,
                length, length, block_size, module.is_causal,
            )
            extended = (partial | full)[0].to(torch.float32) + full[0].to(torch.float32)
            ext_title = f"extended plan, {length} tokens (block {block_size}; bright = full)"
        for h in range(heads):
            panels = (
                (amplified[h], f"head {h}: Box-Cox (lambda={profile.box_cox_lambda})", "viridis"),
                (module.patterns.corner[h].float(), f"true mask (tau={profile.tau})", "Greys"),
                (extended[h].float(), ext_title, "Greys"),
            )
            for ax, (image, title, cmap) in zip(axes[h], panels):
                ax.imshow(image.numpy(), cmap=cmap, interpolation="nearest")
                ax.set_title(title, fontsize=8)
                ax.set_xlabel("key")
                ax.set_ylabel("query")
        fig.suptitle(f"{name} (PCL {profile.pcl}, mu={profile.mu})")
        fig.tight_layout()
        path = directory / _file_name(name)
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    written.append(plot_density_grid(profile.block_density(length, block_size), directory / "density.png", length))
    return written


def plot_density_grid(densities: dict[str, torch.Tensor], path: Path, length: int) -> Path:
    """A (module x head) heatmap of kept-block density; ``densities`` maps module name -> float ``[H]``."""
    plt = _pyplot()
    names = list(densities)
    grid = torch.nn.utils.rnn.pad_sequence([densities[n] for n in names], batch_first=True, padding_value=float("nan"))
    fig, ax = plt.subplots(figsize=(max(4, 0.4 * grid.shape[1] + 2), max(3, 0.3 * len(names) + 1.5)))
    image = ax.imshow(grid.numpy(), cmap="magma", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.set_xlabel("query head")
    ax.set_title(f"kept-block density at {length} tokens (mean {float(grid.nanmean()):.3f})")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_site_blocks(measures: dict[str, "SiteMeasure"], directory: Path, max_heads: int = 32) -> list[Path]:
    """One ``<module>.png`` per measured attention module: each head's block plan at the measured length
    (black dropped, grey partial, white full), titled with its density and attention-mass recall."""
    plt = _pyplot()
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, m in measures.items():
        heads = min(len(m.density), max_heads)
        cols = min(8, heads)
        rows = cdiv(heads, cols)
        fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
        for h, ax in enumerate(axes.flat):
            ax.axis("off")
            if h >= heads:
                continue
            ax.imshow(m.blocks[h].numpy(), cmap="Greys_r", vmin=0, vmax=2, interpolation="nearest")
            recall = f", recall {m.recall[h]:.3f}" if m.recall else ""
            ax.set_title(f"head {h}: density {m.density[h]:.3f}{recall}", fontsize=6)
        fig.suptitle(f"{name or '(top level)'}: block plan at {m.q_len} x {m.kv_len} tokens ({m.path})", fontsize=8)
        fig.tight_layout()
        path = directory / _file_name(name or "top_level")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written
