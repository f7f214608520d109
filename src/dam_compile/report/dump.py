"""Dumps: for each compiled graph, its code before and after the pass and a table of its attention sites, with
an ``index.html`` linking them; :func:`write_explain` adds what ``explain`` measured (mask heatmaps, a density
grid) and an ``index.html`` over the whole dump."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from dam_compile.passes.pipeline import SiteReport

if TYPE_CHECKING:
    from dam_compile.calibration.profile import DAMProfile
    from .site_measures import SiteMeasure

GRAPH_FILES = ("before.py", "after.py", "sites.md", "sites.json")

TABLE_COLUMNS = (
    "node", "module_path", "query", "key", "attn_mask", "is_causal", "scale", "enable_gqa", "decision",
    "dynamic_heads", "reason",
)


def dynamic_heads_text(heads: list[int] | None) -> str:
    """A calibrated site's dynamic heads as the tables show them: ``"1, 3"``, ``"none"``; ``"-"`` elsewhere."""
    if heads is None:
        return "-"
    return ", ".join(map(str, heads)) if heads else "none"


def _cell(site: SiteReport, column: str) -> str:
    value = getattr(site, column)
    return dynamic_heads_text(value) if column == "dynamic_heads" else str(value)


def sites_markdown(sites: Sequence[SiteReport]) -> str:
    """The sites as a Markdown table (one row per SDPA node)."""
    header = "| " + " | ".join(TABLE_COLUMNS) + " |"
    rule = "|" + "---|" * len(TABLE_COLUMNS)
    rows = ["| " + " | ".join(_cell(s, c).replace("|", "\\|") for c in TABLE_COLUMNS) + " |" for s in sites]
    return "\n".join([header, rule, *rows]) + "\n"


def next_dump_dir(root: str | Path) -> Path:
    """A fresh ``graph_NNN`` folder under ``root``; earlier dumps are never overwritten."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    index = 0
    while True:
        target = root / f"graph_{index:03d}"
        try:
            target.mkdir()
            return target
        except FileExistsError:
            index += 1


def write_dump(
    root: str | Path, *, before: str, after: str, sites: Sequence[SiteReport], summary: dict
) -> Path:
    """Write ``before.py``, ``after.py``, ``sites.json``, ``sites.md`` and ``index.html``; returns the folder."""
    target = next_dump_dir(root)
    (target / "before.py").write_text(before)
    (target / "after.py").write_text(after)
    payload = {**summary, "sites": [s.as_dict() for s in sites]}
    (target / "sites.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    title = (
        f"{target.name}: {summary['rewritten']} rewritten, {summary['dense']} dense "
        f"(mask_source={summary['config']['mask_source']})"
    )
    (target / "sites.md").write_text(f"# {title}\n\n" + sites_markdown(sites))
    links = "".join(f'<li><a href="{name}">{name}</a></li>' for name in GRAPH_FILES)
    body = f"<ul>{links}</ul>{sites_html(sites)}"
    (target / "index.html").write_text(_page(title, body))
    return target


def sites_html(sites: Sequence[SiteReport]) -> str:
    head = "".join(f"<th>{c}</th>" for c in TABLE_COLUMNS)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(s, c))}</td>" for c in TABLE_COLUMNS) + "</tr>" for s in sites
    )
    return f"<table><tr>{head}</tr>{rows}</table>"


def write_explain(root: Path, *, text: str, json_text: str, sites: Sequence[SiteReport],
                  measures: Mapping[str, "SiteMeasure"], profile: "DAMProfile | None" = None) -> Path:
    """An explain report's files: ``explain.txt`` (``text``), ``explain.json`` (``json_text``),
    ``masks/<module>.png`` and ``density.png`` (when ``measures`` has any; needs matplotlib), with a profile its
    per-head figures (Box-Cox map, true mask, extended plan) under ``masks/profile/``, and ``index.html`` linking
    every graph folder under ``root``. Returns the index path."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "explain.json").write_text(json_text + "\n")
    (root / "explain.txt").write_text(text + "\n")
    images: list[Path] = []
    if measures:
        import torch

        from .visuals import plot_density_grid, plot_profile, plot_site_blocks

        images = plot_site_blocks(measures, root / "masks")
        length = max(m.kv_len for m in measures.values())
        densities = {n: torch.tensor(m.density) for n, m in measures.items()}
        images.insert(0, plot_density_grid(densities, root / "density.png", length))
        if profile is not None:
            images += plot_profile(profile, root / "masks" / "profile", length=length)
    graphs = sorted(p for p in root.glob("graph_*") if (p / "index.html").is_file())
    graph_links = "".join(
        f'<li><a href="{g.name}/index.html">{g.name}</a>: '
        + ", ".join(f'<a href="{g.name}/{f}">{f}</a>' for f in GRAPH_FILES) + "</li>" for g in graphs
    )
    figures = "".join(
        f'<figure><img src="{p.relative_to(root).as_posix()}"><figcaption>{html.escape(p.stem)}</figcaption></figure>'
        for p in images
    )
    body = (
        f"<pre>{html.escape(text)}</pre>"
        '<p><a href="explain.json">explain.json</a> · <a href="explain.txt">explain.txt</a></p>'
        f"<h2>Graphs</h2><ul>{graph_links}</ul><h2>Attention sites</h2>{sites_html(sites)}"
        f"<h2>Masks</h2>{figures or '<p>not measured (explain(measure=False))</p>'}"
    )
    index = root / "index.html"
    index.write_text(_page("dam-compile: what the compiler did", body))
    return index


def _page(title: str, body: str) -> str:
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n")
