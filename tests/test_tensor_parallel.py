"""Tensor parallelism: a tiny HF Llama sharded over two CPU processes (gloo) with PyTorch's
``parallelize_module`` (attention and MLP projections column/row-wise, as HF's ``tp_plan`` does) and compiled
with ``backend="dam"`` on each rank. Each rank's graph sees its local heads; its output must equal the unsharded
model compiled with the same options: the dense source within float tolerance of full attention, the dynamic
source with the same per-head plans as one process (its sparsity changes the output, so the test can tell)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from hf_models import llama

WORLD = 2
SEQ = 256
OPTIONS = dict(kernel="reference", min_seq_len=0, block_size=16, strict=True, dense_layers=0)
TP_PLAN = {"self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
           "self_attn.o_proj": "rowwise", "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise",
           "mlp.down_proj": "rowwise"}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _sharded(model, mesh):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    plan = {f"model.layers.{i}.{name}": styles[style]()
            for i in range(len(model.model.layers)) for name, style in TP_PLAN.items()}
    return parallelize_module(model, mesh, plan)


def _worker(rank: int, store: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import dam_compile

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        ids = torch.randint(0, 96, (1, SEQ), generator=torch.Generator().manual_seed(1))
        result = {}
        for source in ("dense", "dynamic"):
            backend = dam_compile.backend(mask_source=source, **OPTIONS)
            torch.manual_seed(0)
            single = llama().eval()
            with torch.no_grad():
                full = single(ids).logits
                one = torch.compile(single, backend=backend)(ids).logits
            torch._dynamo.reset()
            torch.manual_seed(0)
            model = _sharded(llama().eval(), mesh)
            dam_compile.kernels.reset_runtime_stats()
            with torch.no_grad():
                tp = torch.compile(model, backend=backend)(ids).logits
            torch._dynamo.reset()
            result[source] = dict(tp_vs_one=_rel(tp, one), one_vs_full=_rel(one, full),
                                  heads=model.model.layers[0].self_attn.q_proj.weight.to_local().shape[0] // 16,
                                  paths=dam_compile.kernels.runtime_stats())
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes, four compiles each
def test_tensor_parallel_ranks_compute_what_one_process_computes(tmp_path):
    pytest.importorskip("torch.distributed.tensor.parallel")
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
