"""``dam_compile.explain``: what the backend does to a model, on example inputs, in one report.

Modelled on ``torch._dynamo.explain`` (which it calls for graphs and graph breaks): it compiles the model with
``backend="dam"`` under the given options, runs it once, and returns every attention site with its decision
and reason, the path the op took at run time, and (``measure=True``) the density and attention-mass recall of
each (layer, head)'s mask on these inputs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .compile_backend import backend, graph_reports
from .config import DAMConfig
from .report.dump import dynamic_heads_text, write_explain
from .ops.dispatch import reset_runtime_stats, runtime_stats
from .passes.pipeline import SiteReport
from .report.site_measures import PlanMeasure, SiteMeasure


@dataclass
class ExplainReport:
    """Graphs, graph breaks, attention sites (decision and reason), run-time paths and mask measures."""

    graph_count: int
    graph_break_count: int
    break_reasons: list[str]
    sites: list[SiteReport]
    runtime_paths: dict[str, int]
    measures: dict[str, SiteMeasure] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)
    dump_dirs: list[str] = field(default_factory=list)

    @property
    def rewritten(self) -> int:
        return sum(s.decision == "sparse" for s in self.sites)

    def to_dict(self) -> dict[str, Any]:
        measures = {}
        for name, m in self.measures.items():
            measures[name] = {k: v for k, v in asdict(m).items() if k != "blocks"}
        return {
            "graph_count": self.graph_count, "graph_break_count": self.graph_break_count,
            "break_reasons": self.break_reasons, "sites": [s.as_dict() for s in self.sites],
            "runtime_paths": self.runtime_paths, "measures": measures, "config": self.config,
            "fallbacks": self.fallbacks, "dump_dirs": self.dump_dirs,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def __str__(self) -> str:
        lines = [
            f"{self.graph_count} graph(s), {self.graph_break_count} graph break(s); {len(self.sites)} attention "
            f"site(s): {self.rewritten} rewritten, {len(self.sites) - self.rewritten} dense "
            f"(mask_source={self.config.get('mask_source')}{_split(self.config)})",
        ]
        lines += [f"  break: {reason}" for reason in self.break_reasons]
        lines += [f"  pass failed, graph compiled unmodified: {f}" for f in self.fallbacks]
        rows = [("module", "decision", "dynamic heads", "density", "recall (mean/min)", "run-time path", "reason")]
        for site in self.sites:
            m = self.measures.get(site.module_path)
            density = f"{_mean(m.density):.3f}" if m else "-"
            recall = f"{_mean(m.recall):.3f}/{min(m.recall):.3f}" if m and m.recall else "-"
            path = f"{m.path}: {m.path_reason}" if m else "-"
            rows.append((site.module_path or site.node, site.decision, dynamic_heads_text(site.dynamic_heads),
                         density, recall, path, site.reason))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        for r in rows:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        if self.runtime_paths:
            lines.append("run-time paths: " + ", ".join(f"{k} x{v}" for k, v in self.runtime_paths.items()))
        if self.dump_dirs:
            lines.append("dump: " + ", ".join(self.dump_dirs))
        return "\n".join(lines)


def explain(
    model: torch.nn.Module,
    *example_inputs: Any,
    example_kwargs: dict[str, Any] | None = None,
    measure: bool = True,
    progress: bool = False,
    **options: Any,
) -> ExplainReport:
    """Compile ``model`` with ``backend="dam"`` and ``options``, run it on the example inputs (under
    ``torch.no_grad()``) and report what happened. ``model`` is not modified.

    Args:
        model: any module whose forward calls ``scaled_dot_product_attention``.
        example_inputs, example_kwargs: its positional and keyword inputs (``input_ids=...`` for HF models).
        measure: also run the model eagerly with each call's plan built, to report per-(layer, head) density and
            attention-mass recall (costs a full-attention pass per layer, in query-row chunks).
        options: ``dam`` backend options (:class:`DAMConfig`); with ``dump_dir`` the dump also gets mask
            heatmaps, a density grid and an ``index.html``.
        progress: show a progress bar while measuring (the CLI does).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    config = DAMConfig.from_options(options)
    kwargs = dict(example_kwargs or {})
    with torch.no_grad():
        dynamo = torch._dynamo.explain(model)(*example_inputs, **kwargs)
        torch._dynamo.reset()
        first = max((r.index for r in graph_reports()), default=-1)
        reset_runtime_stats()
        torch.compile(model, backend=backend(**options))(*example_inputs, **kwargs)
        reports = [r for r in graph_reports() if r.index > first]
        paths = runtime_stats()
        torch._dynamo.reset()  # leave no compiled code behind for the caller's model
        measures = {}
        if measure:
            sites = sum(len(r.sites) for r in reports)
            with tqdm(total=sites, desc="dam: measuring masks", unit="site", disable=not progress) as bar, \
                    PlanMeasure(model, config, bar) as probe:
                model(*example_inputs, **kwargs)
            measures = probe.sites
    report = ExplainReport(
        graph_count=dynamo.graph_count,
        graph_break_count=dynamo.graph_break_count,
        break_reasons=[str(b.reason) for b in dynamo.break_reasons],
        sites=[s for r in reports for s in r.sites],
        runtime_paths=paths,
        measures=measures,
        config={k: v for k, v in config.describe().items() if k != "dump_dir"},
        fallbacks=[r.fallback for r in reports if r.fallback],
        dump_dirs=[r.dump_dir for r in reports if r.dump_dir],
    )
    if config.dump_dir:
        write_explain(Path(config.dump_dir), text=str(report), json_text=report.to_json(), sites=report.sites,
                      measures=report.measures, profile=config.profile)
    return report


def _split(config: dict[str, Any]) -> str:
    """``", profile: k of N heads dynamic"`` for a calibrated config, else empty."""
    profile = config.get("profile") if config.get("mask_source") == "calibrated" else None
    return f", profile: {profile['dynamic_head_count']} heads dynamic" if isinstance(profile, dict) else ""


def _mean(values: list[float]) -> float:
    return sum(values) / max(1, len(values))
