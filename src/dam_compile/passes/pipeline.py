"""The whole rewrite: find -> decide -> insert mask generation -> replace, on a copy of the graph, checked
structurally before it is handed on. The caller's graph module is never modified."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node

from dam_compile.kernels.constants import ALWAYS_DENSE
from dam_compile.ops.dense_layers import dense_layer_reason
from dam_compile.plan.mask_options import MaskOptions
from .causal_mask import SIZES_ONLY, causal_reading
from .decide import Decision, decide, example_value
from .decode_path import dense_decode_reason
from .find_sdpa import SDPASite, find_sdpa_sites, read_site
from .gqa import read_before_repeat
from .insert_mask import insert_mask_generation
from .key_padding import KeyPaddingNodes, insert_key_padding
from .rewrite import replace_with_sparse_attention
from .profile_protocol import ProfileMismatchError, SiteProfile, profile_entry
from .verify import RewrittenSite, check_rewrite


NO_PROFILE_ENTRY = "the profile has no entry for module"
_DYNAMO_ATTRIBUTES = ("_param_name_to_source", "_buffer_name_to_source")


@dataclass
class SiteReport:
    """One attention site as the dumps and logs show it."""

    node: str
    module_path: str
    source: str
    query: str
    key: str
    value: str
    dtype: str
    attn_mask: str
    is_causal: Any
    dropout_p: Any
    scale: Any
    enable_gqa: Any
    decision: str  # "sparse" or "dense"
    reason: str
    mask_source: str | None
    reaches_min_seq_len: bool = True  # whether its key length can be min_seq_len or more
    dynamic_heads: list[int] | None = None  # a calibrated site's heads that run the dynamic plan (retrieval heads)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RewriteResult:
    """The rewritten copy, a report per site, and what the structural check compared."""

    graph_module: GraphModule
    sites: list[SiteReport] = field(default_factory=list)
    replaced: list[RewrittenSite] = field(default_factory=list)
    val_map: dict[Node, Node] = field(default_factory=dict)


def copy_graph_module(gm: GraphModule) -> tuple[GraphModule, dict[Node, Node]]:
    """A new GraphModule over a copy of ``gm``'s graph, sharing its submodules and parameters (nothing is
    duplicated in memory); the map takes original nodes to their copies."""
    graph = Graph()
    val_map: dict[Node, Node] = {}
    output = graph.graph_copy(gm.graph, val_map)
    val_map[gm.graph.output_node()] = graph.output(output)
    graph._codegen = gm.graph._codegen
    new_gm = GraphModule(gm, graph, class_name=type(gm).__name__)
    # Dynamo's metadata (compile id, parameter sources) tells AOTAutograd which inputs are static (parameters,
    # a static KV cache): without it CUDA graphs refuse the graph's in-place cache updates.
    new_gm.meta.update(gm.meta)
    for name in _DYNAMO_ATTRIBUTES:
        if hasattr(gm, name):
            setattr(new_gm, name, dict(getattr(gm, name)))  # a copy: the pass adds its own buffers
    for orig, copy in val_map.items():
        if hasattr(orig, "_dynamo_source"):
            copy._dynamo_source = orig._dynamo_source
    return new_gm, val_map


def rewrite_attention(gm: GraphModule, options: MaskOptions, profile: SiteProfile | None = None) -> RewriteResult:
    """Rewrite every eligible SDPA node of ``gm`` into ``dam::sparse_attention`` with plans built per
    ``options``; ``profile`` is the calibrated source's (``DAMConfig.mask_options()`` and ``DAMConfig.profile``).
    ``gm`` is left as it was."""
    if not isinstance(options, MaskOptions):
        raise TypeError(f"options must be a MaskOptions (DAMConfig.mask_options()), got {type(options).__name__}")
    if options.source == "calibrated" and profile is None:
        raise ValueError("profile: the calibrated source needs the calibrated profile")
    new_gm, val_map = copy_graph_module(gm)
    graph = new_gm.graph
    original = {copy: orig for orig, copy in val_map.items()}
    reports, done = [], []
    masks = _MaskReadings()
    for node in [site.node for site in find_sdpa_sites(graph)]:
        # Read each site when its turn comes: an earlier rewrite may have replaced one of its inputs (an
        # attention whose output feeds the next one directly).
        site = read_site(node)
        decision = decide(site)
        entry = None
        if decision.rewrite and options.source == "calibrated":
            entry = profile_entry(profile, site)
            if entry is None:
                decision = Decision(False, f"{NO_PROFILE_ENTRY} {site.module_path or '(top level)'!r}")
        reports.append(_report(site, decision.rewrite, decision.reason, options))
        if not decision.rewrite:
            continue
        site_options, kept_dense = options, dense_layer_reason(site.module_path, options.dense_layers)
        if kept_dense is not None:
            # Still rewritten (the op's dense path is SDPA): its calls are counted and checked like the others'.
            site_options = replace(options, min_seq_len=ALWAYS_DENSE)
            reports[-1].decision, reports[-1].reason, reports[-1].mask_source = "dense", kept_dense, None
            reports[-1].reaches_min_seq_len = False
        decode_dense = dense_decode_reason(read_before_repeat(site), options)
        if decode_dense is not None:
            reports[-1].decision, reports[-1].reason, reports[-1].mask_source = "dense", decode_dense, None
            # Its size guard may bound the keys below min_seq_len: then nothing is missed (no dense warning).
            reports[-1].reaches_min_seq_len = kept_dense is None and _can_reach(example_value(site.key),
                                                                                site_options.min_seq_len)
            continue
        name = site.node.name
        site, padding, mask_dropped = masks.read(site, reports[-1])
        grouped = read_before_repeat(site)
        if grouped is not site:
            reports[-1].reason += "; reads K/V before repeat_kv (grouped heads)"
            site = grouped
        mask = insert_mask_generation(new_gm, site, site_options, profile, entry)
        op = replace_with_sparse_attention(graph, site, mask, site_options, padding)
        if entry is not None:
            reports[-1].dynamic_heads = list(mask.dynamic_heads)
        done.append(RewrittenSite(
            name, mask.plan.target, mask.plan, mask.outputs, op, mask.patterns, mask.decode,
            kv_sources=(original[site.key].name, original[site.value].name), mask_dropped=mask_dropped,
            padding=padding, plan_inputs=mask.plan_inputs,
        ))
    unmatched = [r for r in reports if r.reason.startswith(NO_PROFILE_ENTRY)]
    if unmatched and len(unmatched) == len(reports):
        raise ProfileMismatchError(
            f"the profile's modules ({', '.join(list(profile.modules)[:3])}, ...) match none of this "
            f"graph's attention modules ({', '.join(r.module_path or r.node for r in unmatched[:3])}): it was "
            "calibrated for another model"
        )
    graph.lint()
    new_gm.recompile()
    check_rewrite(gm.graph, graph, val_map, done)
    return RewriteResult(new_gm, reports, done, val_map)


@dataclass
class _MaskReadings:
    """What each mask node of the graph is (read once, however many sites share it: HF hands one mask to every
    layer) and, for a causal-and-padding mask, its shared key padding nodes."""

    readings: dict[Node, str | None] = field(default_factory=dict)
    paddings: dict[Node, KeyPaddingNodes] = field(default_factory=dict)

    def read(self, site: SDPASite, report: SiteReport) -> tuple[SDPASite, KeyPaddingNodes | None, bool]:
        """``(site as rewritten, its key padding nodes or None, whether its mask was read away)``; the report's
        reason says what was read."""
        mask = site.attn_mask
        if not isinstance(mask, Node):
            return site, None, False
        if mask not in self.readings:
            self.readings[mask] = causal_reading(site)
        reading = self.readings[mask]
        if reading is None:
            return site, None, False
        if reading == SIZES_ONLY:
            report.reason += "; attn_mask is the causal mask, computed from sizes alone: read as is_causal=True"
            return replace(site, attn_mask=None, is_causal=True), None, True
        if mask not in self.paddings:
            self.paddings[mask] = insert_key_padding(mask)
        padding = self.paddings[mask]
        report.reason += ("; attn_mask is the causal mask and a key padding vector: read as is_causal=True with its "
                          "last row, described once per forward by dam::key_padding (no mask when every key is "
                          "valid, per-sequence key ranges for padding)")
        return replace(site, attn_mask=padding.row, is_causal=True), padding, True


def _describe(arg: Any) -> str:
    value = example_value(arg)
    if isinstance(value, torch.Tensor):
        dims = ", ".join(str(d) for d in value.shape)
        return f"{str(value.dtype).removeprefix('torch.')}[{dims}]"
    return "None" if arg is None else repr(value)


def _report(site: SDPASite, rewrite: bool, reason: str, options: MaskOptions) -> SiteReport:
    q = example_value(site.query)
    return SiteReport(
        node=site.node.name,
        module_path=site.module_path,
        source=site.source,
        query=_describe(site.query),
        key=_describe(site.key),
        value=_describe(site.value),
        dtype=str(getattr(q, "dtype", "?")).removeprefix("torch."),
        attn_mask=_describe(site.attn_mask),
        is_causal=site.is_causal if isinstance(site.is_causal, bool) else repr(site.is_causal),
        dropout_p=site.dropout_p if isinstance(site.dropout_p, (int, float)) else repr(site.dropout_p),
        scale=site.scale if site.scale is None or isinstance(site.scale, (int, float)) else repr(site.scale),
        enable_gqa=site.enable_gqa if isinstance(site.enable_gqa, bool) else repr(site.enable_gqa),
        decision="sparse" if rewrite else "dense",
        reason=reason,
        mask_source=options.source if rewrite else None,
        reaches_min_seq_len=_can_reach(example_value(site.key), options.min_seq_len),
    )


def _can_reach(key: Any, min_seq_len: int) -> bool:
    """Whether ``key`` (``[B, KVH, Lk, E]``) can hold ``min_seq_len`` keys or more: its static length, or the
    upper bound Dynamo's guards leave a symbolic one (no guard is added). True when unknown."""
    if not isinstance(key, torch.Tensor) or key.dim() < 2:
        return True
    length = key.shape[-2]
    if isinstance(length, int):
        return length >= min_seq_len
    node = length.node
    return bool(node.shape_env.bound_sympy(node.expr).upper >= min_seq_len)
