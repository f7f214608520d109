"""MaskOptions: the plain values the pass builds each op's arguments from, by name."""

import dataclasses

import pytest
import torch

from dam_compile import DAMConfig, DAMProfile
from dam_compile.plan.mask_options import MASK_SOURCES
from dam_compile.passes.pipeline import rewrite_attention

from dam_testing import capture_graph, sdpa

# Each builder with example arguments, and the op whose schema names its keys.
BUILDERS = {
    "dense": (lambda o: o.dense_plan_kwargs(True), torch.ops.dam.dense_plan.default),
    "streaming": (lambda o: o.streaming_plan_kwargs(True), torch.ops.dam.streaming_plan.default),
    "dynamic": (lambda o: o.dynamic_plan_kwargs(True, 0.5), torch.ops.dam.dynamic_plan.default),
    "hybrid": (lambda o: o.dynamic_plan_kwargs(True, 0.5), torch.ops.dam.hybrid_plan.default),
    "decode": (lambda o: o.decode_plan_kwargs(0.5), torch.ops.dam.decode_plan.default),
    "attention": (lambda o: o.attention_kwargs(True, False), torch.ops.dam.sparse_attention.default),
}


def small_profile():
    maps = {"attn": torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(0)).tril()}
    return DAMProfile.from_mean_attention(maps, {"attn": True}, box_cox_lambda=0.5, tau=0.3, mu=0.8,
                                          model_fingerprint="x", samples=1)


@pytest.mark.parametrize("source", MASK_SOURCES)
def test_config_converts_every_value(source):
    config = DAMConfig(mask_source=source, profile=small_profile() if source == "calibrated" else None,
                       block_size=32, tau=0.11, box_cox_lambda=0.22, mu=0.33, density=0.44, mass_target=0.55,
                       sink_blocks=3, local_blocks=4, kernel="reference", min_seq_len=7, estimator="pooled")
    options = config.mask_options()
    for name in ("block_size", "tau", "box_cox_lambda", "mu", "density", "mass_target", "sink_blocks",
                 "local_blocks", "kernel", "min_seq_len", "estimator"):
        assert getattr(options, name) == getattr(config, name), name
    assert options.source == source and options.corner_len == (8 if source == "calibrated" else 0)


@pytest.mark.parametrize("op", list(BUILDERS))
def test_every_argument_goes_by_a_name_of_the_op_schema(op):
    options = DAMConfig(tau=0.11, mu=0.33, density=0.44).mask_options()
    build, target = BUILDERS[op]
    kwargs = build(options)
    assert set(kwargs) <= {a.name for a in target._schema.arguments}
    for name in set(kwargs) & {"tau", "mu", "density"}:  # three floats that a positional row could swap
        assert kwargs[name] == getattr(options, name)


def test_plan_ops_run_with_named_arguments():
    q, k = torch.randn(1, 2, 64, 8), torch.randn(1, 2, 64, 8)
    options = DAMConfig(mask_source="streaming", block_size=16, min_seq_len=0, kernel="reference").mask_options()
    for source in ("dense", "streaming", "dynamic"):
        opts = dataclasses.replace(options, source=source)
        counts = getattr(torch.ops.dam, f"{source}_plan")(q, k, **opts.prefill_plan_kwargs(True, None))[0]
        assert counts.shape[-1] == 4 and counts.sum() > 0
    counts, _ = torch.ops.dam.decode_plan(q[:, :, -1:], k, None, None, None, **options.decode_plan_kwargs(None))
    assert counts.shape == (1, 2, 1)


def test_bad_options_raise_naming_the_argument():
    options = DAMConfig().mask_options()
    with pytest.raises(ValueError, match="source must be one of"):
        dataclasses.replace(options, source="magic")
    with pytest.raises(ValueError, match="corner_len"):
        dataclasses.replace(options, source="calibrated", corner_len=0)
    (gm,) = capture_graph(sdpa, *(torch.randn(1, 2, 40, 8) for _ in range(3)), is_causal=True)
    with pytest.raises(TypeError, match="options must be a MaskOptions"):
        rewrite_attention(gm, DAMConfig())
    with pytest.raises(ValueError, match="profile"):
        rewrite_attention(gm, dataclasses.replace(options, source="calibrated", corner_len=8))
