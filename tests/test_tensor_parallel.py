"""Tensor parallelism: a tiny HF Llama sharded over two CPU processes (gloo) with PyTorch's
``parallelize_module`` (attention and MLP projections column/row-wise, as HF's ``tp_plan`` does) and compiled
with ``backend="dam"`` on each rank. Each rank's graph sees its local heads; its output must equal the unsharded
model compiled with the same options: the dense source within float tolerance of full attention, the dynamic
source with the same per-head plans as one process (its sparsity changes the output, so the test can tell), and
a calibrated profile of the whole model (some heads dynamic) sliced by the backend to each rank's heads. Without a
process group, ``profile_for_graph`` leaves the profile as it is given (the slices themselves:
tests/calibration/test_profile.py)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from dam_compile import DAMProfile, ProfileMismatchError
from dam_compile.tensor_parallel import profile_for_graph, tensor_parallel_rank

from dam_testing import capture_graph, sdpa
from hf_models import llama

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

WORLD = 2
SEQ = 256
# density: a cap, so that the dynamic plans are sparse (the default keeps 0.99 of the mass: every block of a
# random model's diffuse attention).
OPTIONS = dict(kernel="reference", min_seq_len=0, block_size=16, strict=True, dense_layers=0, density=0.3)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _worker(rank: int, store: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import dam_compile

    sys.path.insert(0, str(BENCHMARKS))
    from bench_tp import shard  # the sharding the benchmark measures: HF's tp_plan for Llama

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        ids = torch.randint(0, 96, (1, SEQ), generator=torch.Generator().manual_seed(1))
        result = {}
        for source in ("dense", "dynamic", "calibrated"):
            options = dict(OPTIONS, mask_source=source)
            torch.manual_seed(0)
            single = llama().eval()
            if source == "calibrated":  # the whole model's profile; heads 1 and 2 of layer 1 lie on both ranks
                calibration = [torch.randint(1, 96, (2, 24), generator=torch.Generator().manual_seed(i)) for i in range(3)]
                profile = dam_compile.calibrate(single, calibration, pcl=16, min_recall=None, progress=False)
                options["profile"] = profile.with_dynamic_heads({"model.layers.1.self_attn": [1, 2]})
            backend = dam_compile.backend(**options)
            with torch.no_grad():
                full = single(ids).logits
                one = torch.compile(single, backend=backend)(ids).logits
            torch._dynamo.reset()
            torch.manual_seed(0)
            model = shard(llama().eval(), mesh)
            dam_compile.reset_runtime_stats()
            with torch.no_grad():
                tp = torch.compile(model, backend=backend)(ids).logits
            torch._dynamo.reset()
            result[source] = dict(tp_vs_one=_rel(tp, one), one_vs_full=_rel(one, full),
                                  heads=model.model.layers[0].self_attn.q_proj.weight.to_local().shape[0] // 16,
                                  paths=dam_compile.runtime_stats())
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes, six compiles each
def test_tensor_parallel_ranks_compute_what_one_process_computes(tmp_path):
    pytest.importorskip("torch.distributed.tensor.parallel")
    if not (BENCHMARKS / "bench_tp.py").exists():
        pytest.skip("benchmarks/ is not in this checkout")
    if not torch.distributed.is_gloo_available():
        pytest.skip("gloo backend unavailable")
    torch.multiprocessing.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for source, r in result.items():
            assert r["heads"] == 2, r  # each rank runs its half of the 4 query heads
            # Every local site ran through our op (the reference kernel), none fell back to dense.
            assert r["paths"] and all(name.startswith("reference") for name in r["paths"]), r
            assert r["tp_vs_one"] < 1e-5, (source, r)
        assert result["dense"]["one_vs_full"] < 1e-5
        assert result["dynamic"]["one_vs_full"] > 1e-2  # the dynamic plans are sparse here: equality means something
        assert result["calibrated"]["one_vs_full"] > 1e-2


def whole_profile(heads: int = 4) -> DAMProfile:
    """A profile of ``layers.{0,1}.attn`` with ``heads`` query heads each, layer 1's heads 1 and 2 dynamic."""
    g = torch.Generator().manual_seed(0)
    maps = {name: torch.rand(heads, 16, 16, generator=g).tril() for name in ("layers.0.attn", "layers.1.attn")}
    profile = DAMProfile.from_mean_attention(maps, {n: True for n in maps}, box_cox_lambda=0.5, tau=0.3, mu=0.5,
                                             model_fingerprint="x", samples=1)
    return profile.with_dynamic_heads({"layers.1.attn": [1, 2]})


class Layers(torch.nn.Module):
    """``layers.{0,1}.attn``: what the profile above was made for, with ``heads`` query heads each."""

    def __init__(self, heads: int):
        super().__init__()
        self.layers = torch.nn.ModuleList(Block(heads) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class Block(torch.nn.Module):
    def __init__(self, heads: int):
        super().__init__()
        self.attn = Attention(heads)

    def forward(self, x):
        return self.attn(x)


class Attention(torch.nn.Module):
    def __init__(self, heads: int):
        super().__init__()
        self.heads = heads

    def forward(self, x):
        q = x.unflatten(-1, (self.heads, -1)).transpose(1, 2)
        return sdpa(q, q, q, is_causal=True).transpose(1, 2).flatten(-2)


def test_without_a_process_group_the_profile_is_used_as_given():
    assert tensor_parallel_rank() is None
    (gm,) = capture_graph(Layers(2), torch.randn(1, 32, 16))
    whole = whole_profile()
    assert profile_for_graph(whole, gm) is whole
    assert profile_for_graph(None, gm) is None


def test_a_rank_sized_graph_without_a_process_group_names_shard_heads():
    options = {"kernel": "reference", "min_seq_len": 0, "block_size": 16, "inner_backend": "aot_eager",
               "profile": whole_profile(), "dense_layers": 0}
    with torch.no_grad(), pytest.raises(Exception, match="shard_heads\\(tp_rank, 2\\)") as err:
        torch.compile(Layers(2), backend="dam", options=options)(torch.randn(1, 32, 16))
    assert "ProfileMismatchError" in str(err.value) or isinstance(err.value, ProfileMismatchError)
