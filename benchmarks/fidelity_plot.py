"""The fidelity benchmark's plot: accuracy through ``generate()`` against measured density and against prefill
speedup, one column per length, one marker per variant.
"""

from __future__ import annotations

from pathlib import Path
from statistics import mean

from fidelity_lineup import label_order, row_label


def points(rows: list[dict], length: int) -> dict[str, tuple[float, float | None, float]]:
    """Per variant label at ``length``: (mean density, mean prefill speedup or None, mean generate accuracy),
    over tasks and seeds."""
    out = {}
    for label in sorted({row_label(r) for r in rows if r["length"] == length}, key=label_order):
        got = [r for r in rows if r["length"] == length and row_label(r) == label]
        speedups = [r["prefill_speedup"] for r in got if r.get("prefill_speedup") is not None]
        out[label] = (mean(r["density"] for r in got), mean(speedups) if speedups else None,
                      mean(r["accuracy"] for r in got))
    return out


def plot(rows: list[dict], path: Path) -> Path:
    """Accuracy through ``generate()`` against measured density (top) and prefill speedup over the best dense
    path (bottom), one column per length, one marker per variant (the same colour in every panel)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in rows})
    labels = sorted({row_label(r) for r in rows}, key=label_order)
    colour = dict(zip(labels, plt.get_cmap("tab20").colors))
    fig, axes = plt.subplots(2, max(1, len(lengths)), figsize=(5 * max(1, len(lengths)), 8), squeeze=False)
    for column, length in enumerate(lengths):
        for label, (density, speedup, accuracy) in points(rows, length).items():
            for row, x in ((0, density), (1, speedup)):
                ax = axes[row][column]
                if label == "full":
                    ax.axhline(accuracy, color="black", linestyle="--", label="full attention")
                elif x is not None:
                    ax.scatter([x], [accuracy], color=colour[label], label=label,
                               marker="o" if label.startswith("dam") else "x")
        density_axis(axes[0][column], matplotlib.ticker)
        axes[0][column].set_title(f"{length // 1024}K tokens" if length >= 1024 else f"{length} tokens")
        axes[1][column].set_xlabel("prefill speedup over the best dense path (x)")
        if not any(p[1] for p in points(rows, length).values()):
            axes[1][column].text(0.5, 0.5, "no timings in this run", ha="center", transform=axes[1][column].transAxes)
    for ax in axes.flat:
        ax.set_ylabel("accuracy through generate() (%)")
        ax.set_ylim(-2, 102)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def density_axis(ax, ticker) -> None:
    ax.set_xlabel("measured prefill block density")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())  # the log axis' minor labels overlap
    ax.xaxis.set_major_locator(ticker.FixedLocator([0.03, 0.05, 0.1, 0.15, 0.3, 0.5, 1.0]))
    ax.xaxis.set_major_formatter(ticker.PercentFormatter(xmax=1.0, decimals=0))
