"""Shared helpers of the test suite."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx import Graph

from dam_compile.config import DAMConfig
from dam_compile.plan.dam_patterns import match_patterns

# Options that make the rewritten graph run the sparse reference on a CPU at small sizes.
# dense_layers=0: every layer takes the sparse path these tests check (tests/test_dense_layers.py: the default).
CPU_SPARSE = {"mask_source": "dense", "kernel": "reference", "min_seq_len": 0, "block_size": 16, "inner_backend": "aot_eager",
              "dense_layers": 0}


def rel_err(actual: Tensor, expected: Tensor) -> float:
    assert not torch.isnan(actual).any(), "output has NaN"
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


def tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}[dtype]


def dense_oracle(q, k, v, allowed: Tensor, attn_mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    """float64 attention with a token mask ``allowed`` (broadcastable to [B, H, Lq, Lk]); rows with no allowed
    key give zeros. Written independently of the reference: repeat K/V heads, full score matrix."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            scores = scores + attn_mask.double()
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return weights @ v


def capture_graph(fn, *args, **kwargs):
    """The Dynamo FX graph module(s) ``fn(*args)`` compiles to (no backend work)."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=capture)(*args, **kwargs)
    return graphs


def sdpa(q, k, v, **kwargs):
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


# Small FX graphs for the graph passes' own tests (tests/passes/).


def meta(*shape, dtype=torch.float32, requires_grad=False) -> Tensor:
    """A tensor without data: what a Dynamo graph node's ``example_value`` stands for."""
    return torch.empty(shape, dtype=dtype, device="meta", requires_grad=requires_grad)


def sdpa_graph(target=F.scaled_dot_product_attention, q=None, k=None, v=None, mask=None, positional=False, **kwargs):
    """A hand-built graph ``out = target(q, k, v, ...)`` whose placeholders carry fake values."""
    g = Graph()
    values = {"q": q if q is not None else meta(1, 4, 64, 16), "k": k if k is not None else meta(1, 4, 64, 16),
              "v": v if v is not None else meta(1, 4, 64, 16)}
    if mask is not None:
        values["mask"] = mask
    nodes = {}
    for name, value in values.items():
        nodes[name] = g.placeholder(name)
        nodes[name].meta["example_value"] = value
    if mask is not None:
        kwargs["attn_mask"] = nodes["mask"]
    args = (nodes["q"], nodes["k"], nodes["v"])
    if positional:
        args = (*args, kwargs.pop("attn_mask", None), kwargs.pop("dropout_p", 0.0), kwargs.pop("is_causal", False))
    out = g.call_function(target, args, kwargs)
    g.output(out)
    return g


class AttentionBlock(torch.nn.Module):
    """Causal attention with other work after it (a projection, an activation, a constant)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, q, k, v):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out).relu() + 1


def attention_block_graph():
    """The Dynamo graph module of :class:`AttentionBlock` on ``[1, 2, 40, 16]`` inputs."""
    x = (torch.randn(1, 2, 40, 16) for _ in range(3))
    (gm,) = capture_graph(AttentionBlock().eval(), *x)
    return gm


def mask_options(source: str = "dense", **changes):
    """``MaskOptions`` of :data:`CPU_SPARSE` with another ``source`` (calibrated: a 16-token corner) or values."""
    corner = {"corner_len": 16} if source == "calibrated" else {}
    return dataclasses.replace(DAMConfig(**CPU_SPARSE).mask_options(), source=source, **{**corner, **changes})


def one_module_profile(dynamic=(), heads: int = 4, pcl: int = 16, entry: str = "model.layers.1.self_attn"):
    """``(profile, patterns)``: a profile of the one module ``entry`` whose heads keep the diagonals 0 and 1 and
    column 0; ``dynamic`` heads run the dynamic plan. Only what the passes read (``SiteProfile``); its
    ``find_module`` knows ``entry`` by its exact name."""
    rows, cols = torch.arange(pcl)[:, None], torch.arange(pcl)[None, :]
    mask = ((rows - cols >= 0) & (rows - cols <= 1)) | ((cols == 0) & (rows >= cols))
    patterns = match_patterns(mask.expand(heads, -1, -1).clone(), mu=0.5)
    chosen = torch.zeros(heads, dtype=torch.bool)
    chosen[list(dynamic)] = True
    module = SimpleNamespace(heads=heads, dynamic_heads=chosen)
    return SimpleNamespace(modules={entry: module}, pcl=pcl, find_module={entry: entry}.get,
                           patterns_on=lambda name, device: patterns.to(device)), patterns


def run_graph(gm, **inputs):
    """Run a Dynamo graph module on the inputs of the captured function, by name (its placeholders are ``L_<name>_``,
    in the order the function first used them)."""
    return gm(*(inputs[n.target[2:-1]] for n in gm.graph.nodes if n.op == "placeholder"))


class _SelfAttention(torch.nn.Module):
    def __init__(self, is_causal: bool):
        super().__init__()
        self.is_causal = is_causal

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.is_causal)


class _Layer(torch.nn.Module):
    def __init__(self, is_causal: bool):
        super().__init__()
        self.self_attn = _SelfAttention(is_causal)

    def forward(self, q, k, v):
        return self.self_attn(q, k, v)


class AttentionLayers(torch.nn.Module):
    """``layers`` attention sites at ``layers.<i>.self_attn`` (the module paths of a HuggingFace decoder) with a
    residual between them; ``is_causal=False`` for a decode step (one query row)."""

    def __init__(self, layers: int = 2, is_causal: bool = True):
        super().__init__()
        self.layers = torch.nn.ModuleList(_Layer(is_causal) for _ in range(layers))

    def forward(self, q, k, v):
        for layer in self.layers:
            q = layer(q, k, v) + q
        return q
