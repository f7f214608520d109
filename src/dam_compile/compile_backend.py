"""The ``dam`` torch.compile backend: rewrite attention, dump, then hand the graph to the inner backend.

Registered through the ``torch_dynamo_backends`` entry point, so ``torch.compile(m, backend="dam")`` needs no
import; ``dam_compile.backend(**options)`` gives the same backend with options bound.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch.fx import GraphModule

from .config import DAMConfig
from .ops.dispatch import warn_dense_once
from .report.dump import write_dump
from .calibration.profile import ProfileMismatchError
from .passes.pipeline import SiteReport, rewrite_attention
from .tensor_parallel import profile_for_graph

log = logging.getLogger("dam_compile")

CompiledFn = Callable[..., Any]


@dataclass
class GraphReport:
    """What the backend did to one compiled graph."""

    index: int
    sites: list[SiteReport] = field(default_factory=list)
    fallback: str | None = None  # why the unmodified graph was compiled, if it was
    dump_dir: str | None = None
    pass_s: float = 0.0  # seconds the rewrite (find, decide, insert, replace, check) took

    @property
    def rewritten(self) -> int:
        return sum(s.decision == "sparse" for s in self.sites)

    @property
    def dense(self) -> int:
        return sum(s.decision == "dense" for s in self.sites)


_reports: deque[GraphReport] = deque(maxlen=256)
_graph_counter = 0
_logged_reasons: set[str] = set()


def graph_reports() -> list[GraphReport]:
    """Reports of the graphs compiled by this backend in this process, oldest first (the last 256)."""
    return list(_reports)


def clear_graph_reports() -> None:
    _reports.clear()


def compile_graph(
    gm: GraphModule, example_inputs: Sequence[Any], config: DAMConfig, mode: str | None = None
) -> CompiledFn:
    """Rewrite ``gm``'s attention per ``config`` and compile the result with ``config.inner_backend``. If the
    pass fails, the unmodified graph is compiled and a warning says why (``strict=True`` raises instead)."""
    global _graph_counter
    report = GraphReport(index=_graph_counter)
    _graph_counter += 1
    start = time.perf_counter()
    try:
        result = rewrite_attention(gm, config.mask_options(), profile_for_graph(config.profile, gm))
        compiled_gm, report.sites = result.graph_module, result.sites
    except ProfileMismatchError:
        raise  # a wrong profile is the user's to fix, not a reason to run dense quietly
    except Exception as exc:
        if config.strict:
            raise
        report.fallback = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"dam: the attention pass failed, compiling the graph unmodified ({report.fallback})")
        compiled_gm = gm
    report.pass_s = time.perf_counter() - start
    _log_report(report)
    if config.dump_dir:
        report.dump_dir = str(
            write_dump(
                config.dump_dir,
                before=gm.code,
                after=compiled_gm.code,
                sites=report.sites,
                summary={
                    "graph": report.index,
                    "rewritten": report.rewritten,
                    "dense": report.dense,
                    "fallback": report.fallback,
                    "pass_s": round(report.pass_s, 3),
                    "config": config.describe(),
                },
            )
        )
    _reports.append(report)
    return inner_compile(compiled_gm, example_inputs, config.inner_backend, mode)


def inner_compile(gm: GraphModule, example_inputs: Sequence[Any], inner_backend: str, mode: str | None) -> CompiledFn:
    """Compile the rewritten graph; ``mode`` (from ``torch.compile(mode=...)``) reaches Inductor."""
    if inner_backend == "inductor":
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches = list_mode_options(mode) if mode else None
        return compile_fx(gm, list(example_inputs), config_patches=patches)
    if mode:
        log.warning("dam: mode=%r only applies with inner_backend='inductor'; %s ignores it", mode, inner_backend)
    return torch._dynamo.lookup_backend(inner_backend)(gm, example_inputs)


def _warn_if_all_dense(report: GraphReport) -> None:
    """The one loud warning for a graph whose every attention site stays dense although it can see inputs of
    ``min_seq_len`` tokens or more: no speedup anywhere in it."""
    long_sites = [s for s in report.sites if s.reaches_min_seq_len]
    if long_sites and report.rewritten == 0:
        warn_dense_once(f"every attention site of graph {report.index}", [s.reason for s in long_sites])


def _log_report(report: GraphReport) -> None:
    _warn_if_all_dense(report)
    if report.fallback:
        log.info("dam: graph %d compiled unmodified: %s", report.index, report.fallback)
        return
    log.info(
        "dam: graph %d: %d attention site(s), %d rewritten, %d dense",
        report.index, len(report.sites), report.rewritten, report.dense,
    )
    for site in report.sites:
        if site.decision == "dense" and site.reason not in _logged_reasons:
            _logged_reasons.add(site.reason)
            log.info("dam: %s stays dense: %s", site.module_path or site.node, site.reason)


def dam_backend(
    gm: GraphModule, example_inputs: Sequence[Any], *, options: Mapping[str, Any] | None = None, mode: str | None = None
) -> CompiledFn:
    """The backend behind ``torch.compile(m, backend="dam", options={...})``."""
    return compile_graph(gm, example_inputs, DAMConfig.from_options(options), mode)


def backend(**options: Any) -> CompiledFn:
    """``torch.compile(m, backend=dam_compile.backend(block_size=64, ...))``: the backend with options bound
    (validated now). ``options={...}`` given to ``torch.compile`` as well are applied on top."""
    bound = DAMConfig.from_options(options)

    def dam(
        gm: GraphModule, example_inputs: Sequence[Any], *, options: Mapping[str, Any] | None = None, mode: str | None = None
    ) -> CompiledFn:
        config = bound.replace(options) if options else bound
        return compile_graph(gm, example_inputs, config, mode)

    return dam
