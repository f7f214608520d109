"""Dumps: for each compiled graph, its code before and after the pass and a table of its attention sites."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from .passes.pipeline import SiteReport

TABLE_COLUMNS = (
    "node", "module_path", "query", "key", "attn_mask", "is_causal", "scale", "enable_gqa", "decision", "reason",
)


def sites_markdown(sites: Sequence[SiteReport]) -> str:
    """The sites as a Markdown table (one row per SDPA node)."""
    header = "| " + " | ".join(TABLE_COLUMNS) + " |"
    rule = "|" + "---|" * len(TABLE_COLUMNS)
    rows = [
        "| " + " | ".join(str(getattr(s, c)).replace("|", "\\|") for c in TABLE_COLUMNS) + " |" for s in sites
    ]
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
    """Write ``before.py``, ``after.py``, ``sdpa_sites.json`` and ``sdpa_sites.md``; returns the folder."""
    target = next_dump_dir(root)
    (target / "before.py").write_text(before)
    (target / "after.py").write_text(after)
    payload = {**summary, "sites": [s.as_dict() for s in sites]}
    (target / "sdpa_sites.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    title = (
        f"# {target.name}: {summary['rewritten']} rewritten, {summary['dense']} dense "
        f"(mask_source={summary['config']['mask_source']})\n\n"
    )
    (target / "sdpa_sites.md").write_text(title + sites_markdown(sites))
    return target
