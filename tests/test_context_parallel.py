"""Context parallelism: a tiny HF Llama's prefill sharded over 2 and 4 CPU processes (gloo) by PyTorch's
``context_parallel`` (head-tail load balancing) through ``dam_compile.context_parallel``: each rank's attention
runs PyTorch's ring with our op at every step. Dense source: each rank's logits equal one process's full
attention. Dynamic, streaming and calibrated (token-exact patterns, PCL 32) sources: equal one process's with the
same options, each rank's plan rows equal the one-process plan's rows of its query blocks, and the plans are
sparse (so equality means something; a streaming step whose shard holds none of a rank's blocks computes nothing). The dynamic source
compiled with ``backend="dam"`` gives the eager ring's logits (on 2 ranks)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from hf_models import llama

SEQ = 256  # 2 * 4 ranks * 2 blocks of 16
# density: a cap, so that the dynamic plans of random weights are sparse; local_blocks=1: a streaming window of
# one block, so that some ring steps keep nothing.
OPTIONS = dict(kernel="reference", min_seq_len=0, block_size=16, dense_layers=0, density=0.3, local_blocks=1)
# hybrid: a profile with dynamic heads; previous-token: a profile whose heads keep only diagonal 1, so a rank's
# rows keep nothing of their own shard (and the sequence's first row nothing at all)
SOURCES = ("dense", "dynamic", "streaming", "calibrated", "hybrid", "previous-token")
PROFILE_SOURCES = ("calibrated", "hybrid", "previous-token")


def previous_token_profile(profile):
    """``profile`` with every head's mean attention on the previous token: its patterns are diagonal 1 alone."""
    from dam_compile.calibration.profile import DAMProfile

    pcl = profile.pcl
    mean = {}
    for name, module in profile.modules.items():
        attention = torch.zeros(module.heads, pcl, pcl)
        attention[:, torch.arange(1, pcl), torch.arange(pcl - 1)] = 1.0
        attention[:, 0, 0] = 1.0
        mean[name] = attention
    shifted = DAMProfile.from_mean_attention(
        mean, {n: True for n in mean}, box_cox_lambda=profile.box_cox_lambda, tau=profile.tau, mu=profile.mu,
        model_fingerprint=profile.model_fingerprint, samples=1)
    for module in shifted.modules.values():
        diagonals = module.patterns.diagonals
        assert set(diagonals[diagonals >= 0].tolist()) == {1}, diagonals
    return shifted


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _one_process(model, ids, positions, options) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One process's sparse logits (the reference kernel; a calibrated profile's through the compiled model,
    which SparseReferenceMode does not run), and per attention module the block table of its plan."""
    from dam_compile.plan.pattern_plan import pattern_block_tables
    from dam_compile.reference_mode import SparseReferenceMode, plan_for

    tables = {}
    if options["mask_source"] == "calibrated":
        profile = options["profile"]
        for name in profile.modules:
            p = profile.patterns_on(name, "cpu")
            partial, full = pattern_block_tables(p.diagonals, p.columns, p.corner, SEQ, SEQ, OPTIONS["block_size"], True)
            tables[name] = partial | full
        torch._dynamo.reset()
        with torch.no_grad():
            compiled = torch.compile(model, backend="dam", options=dict(options, inner_backend="aot_eager"))
            logits = compiled(ids, position_ids=positions).logits
        torch._dynamo.reset()
        return logits, tables

    class Recording(SparseReferenceMode):
        def on_attention(self, name, a):
            plan = plan_for(self.config, a["query"], a["key"], True, a["scale"])
            partial, full = plan.block_tables(a["key"].shape[-2])
            tables[name] = partial | full
            return super().on_attention(name, a)

    with torch.no_grad(), Recording(options, model):
        logits = model(ids, position_ids=positions).logits
    return logits, tables


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import dam_compile
    from dam_compile.context_parallel import context_parallel

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        torch.manual_seed(0)
        model = llama().eval()
        ids = torch.randint(0, 96, (1, SEQ), generator=torch.Generator().manual_seed(1))
        positions = torch.arange(SEQ)[None]
        result = {}
        calibration = [torch.randint(1, 96, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(3)]
        profile = dam_compile.calibrate(model, calibration, pcl=32, min_recall=None, progress=False)
        profiles = dict(calibrated=profile, hybrid=profile.with_dynamic_heads({"model.layers.1.self_attn": [1, 2]}),
                        **{"previous-token": previous_token_profile(profile)})
        for source in SOURCES:
            options = dict(OPTIONS, mask_source=source)
            if source in PROFILE_SOURCES:
                options.update(mask_source="calibrated", profile=profiles[source])
            with torch.no_grad():
                full = model(ids, position_ids=positions).logits
            one, tables = _one_process(model, ids, positions, options)
            runs, rows = {}, {}
            for compiled in (False, True) if source == "dynamic" and world == 2 else (False,):  # compiled once: slow
                torch._dynamo.reset()
                run = torch.compile(model, backend="dam", options=dict(options, inner_backend="aot_eager")) \
                    if compiled else model
                local_ids, local_positions = ids.clone(), positions.clone()
                with torch.no_grad(), context_parallel(mesh, buffers=[local_ids, local_positions],
                                                       buffer_seq_dims=[1, 1], model=model, options=options,
                                                       record_rows=True) as ring:
                    out = run(local_ids, position_ids=local_positions).logits[0]
                    mine = local_positions[0].clone()
                runs[compiled], rows[compiled] = out, dict(ring.rows)
            blocks = mine[::OPTIONS["block_size"]] // OPTIONS["block_size"]
            result[source] = dict(
                vs_one=_rel(runs[False], one[0, mine]), one_vs_full=_rel(one, full),
                compiled_vs_eager=_rel(runs[True], runs[False]) if True in runs else None,
                rows_equal=source == "hybrid" or all(  # (a hybrid's dynamic heads: outputs only)
                    torch.equal(*torch.broadcast_tensors(got, tables[name][:, :, blocks]))
                    for run_rows in rows.values() for name, got in run_rows.items()),
                positions=mine.tolist()[:4], steps=ring.steps)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # world-size processes, each runs the model eagerly and under the ring
@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_ranks_compute_what_one_process_computes(world, tmp_path):
    """(PyTorch's own ring merge gave NaN rows for the previous-token profile on 4 ranks.)"""
    pytest.importorskip("torch.distributed.tensor.experimental")
    if not torch.distributed.is_gloo_available():
        pytest.skip("gloo backend unavailable")
    torch.multiprocessing.spawn(_worker, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world, join=True)
    chunk = SEQ // (2 * world)
    for rank in range(world):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["dense"]["positions"][0] == rank * chunk  # head-tail load balancing: chunks r and 2W-1-r
        for source, r in result.items():
            assert r["vs_one"] < 1e-5, (rank, source, r)
            assert r["rows_equal"], (rank, source)
        assert result["dense"]["one_vs_full"] < 1e-5
        assert all(result[s]["one_vs_full"] > 1e-2 for s in SOURCES[1:])  # sparse: equality means something
        if world == 2:
            assert result["dynamic"]["compiled_vs_eager"] < 1e-6
    skipped = [json.loads((tmp_path / f"rank{r}.json").read_text())["streaming"]["steps"]["skipped"] for r in range(world)]
    assert sum(skipped) > 0  # shards holding neither a rank's sink nor its window: no compute


def test_shard_layout_is_context_parallels():
    """Our layout of the shards is the one torch's head-tail load balancer makes."""
    from torch.distributed.tensor.experimental._attention import _HeadTailLoadBalancer

    from dam_compile.context_parallel import ShardLayout

    for world in (2, 4):
        order = _HeadTailLoadBalancer(SEQ, world, torch.device("cpu"))._generate_indices().flatten()
        layout = ShardLayout(world, SEQ // world, load_balanced=True)
        assert torch.equal(layout.order(), order)
        assert torch.equal(ShardLayout(world, SEQ // world, load_balanced=False).order(), torch.arange(SEQ))


def band_profile(module: str, heads: int = 4, pcl: int = 32):
    """A profile whose heads attend to the last three tokens and the first one (no dynamic heads)."""
    from dam_compile.calibration.profile import DAMProfile

    rows, cols = torch.arange(pcl)[:, None], torch.arange(pcl)[None, :]
    attention = (((rows - cols >= 0) & (rows - cols <= 2)) | ((cols == 0) & (rows >= cols))).float()
    attention = (attention / attention.sum(-1, keepdim=True)).expand(heads, -1, -1).clone()
    return DAMProfile.from_mean_attention({module: attention}, {module: True}, box_cox_lambda=0.5, tau=0.3,
                                          mu=0.8, model_fingerprint="test", samples=1)


@pytest.mark.parametrize("source", ["dense", "streaming", "calibrated"])
def test_rows_of_every_rank_are_the_one_process_plans(source):
    """Sources that need no communication: each rank's rows are the one-process plan's rows of its blocks."""
    from dam_compile.config import DAMConfig
    from dam_compile.context_parallel import RingAttention, ShardLayout
    from dam_compile.reference_mode import plan_for

    options = dict(OPTIONS, mask_source=source)
    if source == "calibrated":
        options["profile"] = band_profile("model.layers.1.self_attn")
    config = DAMConfig.from_options(options)
    q, k = torch.randn(1, 4, SEQ, 16), torch.randn(1, 2, SEQ, 16)
    partial, full = plan_for(config, q, k, True, module="model.layers.1.self_attn").block_tables(SEQ)
    whole = partial | full
    assert source == "dense" or whole.float().mean() < 0.4  # sparse: equality means something
    ring = RingAttention(None, config)
    for world in (2, 4):
        layout = ShardLayout(world, SEQ // world, load_balanced=True)
        for rank in range(world):
            mine = layout.positions(rank)
            rows = ring.plan_rows("model.layers.1.self_attn", q[:, :, mine], k[:, :, mine], layout, rank, None, None)
            blocks = mine[::16] // 16
            assert torch.equal(*torch.broadcast_tensors(rows.partial | rows.full, whole[:, :, blocks]))
            assert torch.equal(rows.positions, mine)


def test_shards_that_cut_a_block_are_refused():
    from dam_compile.config import DAMConfig
    from dam_compile.context_parallel import RingAttention, ShardLayout

    ring = RingAttention(None, DAMConfig.from_options(dict(OPTIONS, mask_source="dense")))
    q = torch.randn(1, 4, 24, 16)
    with pytest.raises(ValueError, match="block_size=16"):
        ring.plan_rows("model.layers.1.self_attn", q, q, ShardLayout(2, 24, load_balanced=True), 0, None, None)


@pytest.mark.slow
def test_bench_cp_smoke_runs_both_rings_and_writes_its_summary(tmp_path):
    """``torchrun --nproc-per-node 2 benchmarks/bench_cp.py --smoke``: the flow, on the CPU (no claims)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cp.py"
    if not script.exists():
        pytest.skip("not run from a source checkout")
    out = tmp_path / "cp.json"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), "--smoke", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {r["variant"] for r in result["prefill"]} == {"dense-ring", "dam"}
    assert result["summary"]["cp_max_rel_err_dense"] < 1e-5
    assert result["summary"]["cp_speedup_vs_dense_ring_512k"] is None  # not a length the smoke runs
    assert "524288" in result["summary"]["notes"]["cp_speedup_vs_dense_ring_512k"]
