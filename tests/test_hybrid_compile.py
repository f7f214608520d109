"""A profile with dynamic (retrieval) heads, end to end: the rewrite inserts the hybrid plan, the compiled model
equals a token-exact oracle built from the definitions, generate() equals its eager oracle, and ``inspect`` shows
the split."""

import pytest
import torch

import dam_compile
from dam_compile.cli import main as cli
from dam_compile import calibrate
from dam_compile.config import DAMConfig
from dam_compile.plan.block_plan import BlockSparsePlan
from dam_compile.plan.reference import block_sparse_attention_reference, token_mask
from dam_compile.plan.dam_patterns import extended_mask
from dam_compile.dynamic.dynamic_plan import dynamic_block_plan
from dam_compile.module_stack import AttentionCallMode
from dam_compile.passes.pipeline import rewrite_attention
from dam_compile.passes.verify import expected_digraph, fx_to_digraph
from dam_compile.reference_mode import plan_for

from dam_testing import capture_graph, dense_oracle, rel_err
from hf_models import build, ids_for
from planted_heads import PlantedModel, needle_samples
from graph_matching import isomorphic
from dam_compile import save_profile

OPTIONS = {"kernel": "reference", "min_seq_len": 0, "block_size": 16, "inner_backend": "aot_eager", "density": 0.3,
           "dense_layers": 0}
LAYER0, LAYER1 = "model.layers.0.self_attn", "model.layers.1.self_attn"


@pytest.fixture(scope="module")
def planted():
    model = PlantedModel().eval()
    return model, calibrate(model, needle_samples(4, 512, after=64), pcl=32, progress=False)


@pytest.fixture(scope="module")
def llama():
    """Layer 0 mixed (head 1 dynamic), layer 1 all dynamic."""
    model = build("llama")
    samples = [ids_for("llama", n=24), ids_for("llama", batch=2, n=24)]
    profile = calibrate(model, samples, pcl=16, min_recall=None, progress=False)
    return model, profile.with_dynamic_heads({LAYER0: [1], LAYER1: [0, 1, 2, 3]})


class TokenExactOracle(AttentionCallMode):
    """Each attention call with its mask written from the definitions: the extended DAM mask for pattern heads,
    the dynamic plan's token mask for dynamic heads; float64 dense attention over it."""

    def __init__(self, model, profile, options):
        super().__init__(model)
        self.profile, self.options = profile, DAMConfig(**options).mask_options()

    def on_attention(self, name, a):
        q, k, v = a["query"], a["key"], a["value"]
        module = self.profile.modules[self.profile.find_module(name)]
        b, h, n, _ = q.shape
        allowed = extended_mask(module.patterns, n, n, True)[None].expand(b, h, n, n)
        o = self.options
        lists = dynamic_block_plan(
            q, k, block_size=o.block_size, is_causal=True, scale=a["scale"], tau=o.tau,
            box_cox_lambda=o.box_cox_lambda, mu=o.mu, density=o.density, mass_target=o.mass_target,
            sink_blocks=o.sink_blocks, local_blocks=o.local_blocks, estimator=o.estimator)
        dynamic = token_mask(BlockSparsePlan(*lists[:2], o.block_size, *lists[2:]), n, n, True)
        allowed = torch.where(module.dynamic_heads[None, :, None, None], dynamic, allowed)
        return dense_oracle(q, k, v, allowed, a["attn_mask"], a["scale"]).to(q.dtype)


def run_both(model, profile, *inputs, inner_backend="aot_eager"):
    """The compiled model's outputs on each input (one compiled model: the second length compiles with a symbolic
    one) and the oracle's."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="dam", options={**OPTIONS, "inner_backend": inner_backend,
                                                            "profile": profile})
    logits = lambda o: getattr(o, "logits", o)  # noqa: E731
    pairs = []
    with torch.no_grad():
        for x in inputs:
            with TokenExactOracle(model, profile, OPTIONS):
                expected = model(x)
            pairs.append((logits(compiled(x)), logits(expected)))
    return pairs


@pytest.mark.parametrize("inner_backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_planted_retrieval_head_runs_dynamic_and_matches_the_oracle(planted, inner_backend):
    model, profile = planted
    inputs = [needle_samples(1, n, after=100, seed=5)[0] for n in (200, 173)]
    for out, expected in run_both(model, profile, *inputs, inner_backend=inner_backend):
        assert rel_err(out, expected) < 1e-5
    assert len(dam_compile.graph_reports()) == 2  # the second length: a graph with a symbolic length
    for report in dam_compile.graph_reports():
        (site,) = report.sites
        assert (site.mask_source, site.dynamic_heads) == ("calibrated", [3])
    # Without the split the retrieval head keeps its fixed pattern, and the output differs.
    (out, _), = run_both(model, profile, inputs[0])
    (out_pure, expected_pure), = run_both(model, profile.with_dynamic_heads({"attn": []}), inputs[0])
    assert rel_err(out_pure, expected_pure) < 1e-5 and rel_err(out_pure, out) > 1e-3


def test_grouped_llama_with_mixed_and_all_dynamic_layers_matches_the_oracle(llama):
    model, profile = llama
    (out, expected), = run_both(model, profile, ids_for("llama", n=70))
    assert rel_err(out, expected) < 1e-5
    sites = dam_compile.graph_reports()[-1].sites
    assert [s.dynamic_heads for s in sites] == [[1], [0, 1, 2, 3]]


def test_rewrite_inserts_the_hybrid_plan_where_heads_are_mixed(llama):
    model, profile = llama
    with torch.no_grad():
        (gm,) = capture_graph(model, ids_for("llama", n=40))
    result = rewrite_attention(gm, DAMConfig(**OPTIONS, profile=profile).mask_options(), profile)
    targets = [site.plan_target for site in result.replaced]
    assert targets == [torch.ops.dam.hybrid_plan.default, torch.ops.dam.dynamic_plan.default]
    hybrid = result.replaced[0]
    assert [n.target for n in hybrid.plan_inputs] == ["_dam_model_layers_0_self_attn_dynamic_heads"]
    assert hybrid.plan.kwargs["dynamic_heads"] is hybrid.plan_inputs[0] and len(hybrid.patterns) == 3
    assert isomorphic(expected_digraph(gm.graph, result.replaced), fx_to_digraph(result.graph_module.graph))


class CalibratedReference(AttentionCallMode):
    """The eager oracle of a calibrated profile: each call runs the plan the pass inserts for it (prefill or
    decode) through the PyTorch reference."""

    def __init__(self, model, config):
        super().__init__(model)
        self.config = config

    def on_attention(self, name, a):
        q, k = a["query"], a["key"]
        if q.shape[-2] == 1 and a["is_causal"]:
            return None
        plan = plan_for(self.config, q, k, a["is_causal"], a["scale"], a["attn_mask"], module=name)
        return block_sparse_attention_reference(q, k, a["value"], plan, attn_mask=a["attn_mask"], scale=a["scale"],
                                                is_causal=a["is_causal"], enable_gqa=a["enable_gqa"])


@pytest.mark.slow
def test_generate_with_a_hybrid_profile_equals_its_eager_oracle(llama):
    model, profile = llama
    config = DAMConfig(**OPTIONS, profile=profile)
    x, kwargs = ids_for("llama", n=48), dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with CalibratedReference(model, config):
            expected = model.generate(x, **kwargs)
        model.forward = torch.compile(model.forward, backend="dam", options={**OPTIONS, "profile": profile})
        try:
            out = model.generate(x, **kwargs)
        finally:
            del model.forward
    assert torch.equal(out, expected)
    decode = [r.sites for r in dam_compile.graph_reports() if r.sites and r.sites[0].query.endswith(", 1, 16]")]
    assert decode and all([s.dynamic_heads for s in sites] == [[1], [0, 1, 2, 3]] for sites in decode)


def test_inspect_and_the_dump_show_the_split(planted, tmp_path, capsys):
    _model, profile = planted
    path = save_profile(profile, tmp_path / "planted.safetensors")
    options = ["-o", "block_size=16", "-o", "min_seq_len=0", "-o", "kernel=reference", "-o", f"profile={path}"]
    assert cli.main(["inspect", "planted_heads:make", "--seq-len", "96", "--device", "cpu", "--no-measure",
                     "--dump", str(tmp_path / "dump"), *options]) == 0
    out = capsys.readouterr().out
    assert "profile: 1 of 4 heads dynamic" in out and "dynamic heads" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("attn "))
    assert row.split()[1:3] == ["sparse", "3"]
    assert "| dynamic_heads |" in (tmp_path / "dump" / "graph_000" / "sites.md").read_text()
