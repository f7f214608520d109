"""The kernel benchmark's bookkeeping on the CPU: its summary reads the run's own rows (the measured density and
cuDNN's time, never a typed-in number), a run of some parts leaves the others null with the reason, and the
README table renders every layout."""

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_kernel  # noqa: E402
import readme_tables  # noqa: E402

COMMITTED = json.loads((ROOT / "benchmarks" / "results" / "kernel_h100.json").read_text())


def test_the_sparse_ratio_divides_by_the_measured_density_times_cudnn_dense():
    rows = COMMITTED["rows"]
    summary = bench_kernel.summarize(rows)
    at_128k = [r for r in rows if r["seq_len"] == 131072 and r["density_nominal"] < 1.0]
    worst = max(at_128k, key=lambda r: r["ours_ms"] / (r["density"] * r["cudnn_ms"]))
    assert summary["sparse_vs_cudnn_128k"] == round(worst["ours_ms"] / (worst["density"] * worst["cudnn_ms"]), 3)
    # cuDNN is the bar, not our own dense time: on this run ours dense is slower than cuDNN, so the bar is harder.
    assert summary["sparse_vs_cudnn_128k"] > summary["sparse_efficiency_128k"]
    flex_ratios = [r["speedup_vs_flex"] for r in rows if r["seq_len"] >= 32768 and r["density_nominal"] < 1.0]
    assert summary["vs_flex_min"] == round(min(flex_ratios), 3)
    assert summary["host_us_8k"] is None and "host part" in summary["notes"]["host_us_8k"]


def test_a_host_and_decode_run_summarizes_and_renders_without_the_attention_table():
    host = {"seq_len": 8192, "density": 0.1, "host_us": 57.0, "host_us_loops": [57.0] * 5, "gpu_us": 140.0}
    decode = [
        {"kv_len": 131072, "plan": plan, "density": density, "ours_ms": ms, "kept_kv_bytes": 1, "achieved_gbs": 1.0,
         "copy_gbs": 3000.0, "bw_fraction": fraction, "sdpa_flash_dense_ms": 0.3, "sdpa_dense_bw_fraction": 0.6}
        for plan, density, ms, fraction in (("random", 1.0, 0.4, 0.9), ("random", 0.1, 0.05, 0.55),
                                            ("sink+window+random", 0.1, 0.04, 0.7))
    ]
    summary = bench_kernel.summarize([], host, decode)
    assert summary["host_us_8k"] == 57.0
    # the sparse random plan's, not the dense one's nor the windowed plan's
    assert summary["decode_bw_fraction_128k"] == 0.55
    assert summary["dense_vs_cudnn_32k"] is None and "not run" in summary["notes"]["dense_vs_cudnn_32k"]
    result = dict(COMMITTED, rows=[], host=host, decode=decode, summary=summary)
    table = readme_tables.kernel_table(result)
    assert "| N | density |" not in table and "57.0 us of CPU per call" in table
    assert "| 128K | random | 0.100 | 50.0 |" in table and "| 128K | sink+window+random | 0.100 | 40.0 |" in table
    assert "| `vs_flex_min` | not measured: N=32K and 128K" in table


def test_a_run_with_the_hopper_path_shows_both_kernels_and_graph_decode_times():
    """Rows of a Hopper run carry the path taken, the portable kernel's time and one CTA per tile's; decode
    rows carry the eager call's time beside the CUDA-graph one. Files from before keep their layout."""
    row = dict(COMMITTED["rows"][0], path="hopper", portable_ms=1.5, per_tile_grid_ms=1.25)
    decode = [{"kv_len": 131072, "density": 0.1, "ours_ms": 0.12, "ours_eager_ms": 0.2, "kept_kv_bytes": 1,
               "achieved_gbs": 450.0, "copy_gbs": 4200.0, "bw_fraction": 0.11, "sdpa_flash_dense_ms": 0.15,
               "sdpa_dense_bw_fraction": 0.8}]
    dirty = [dict(decode[0], plan="random", ours_dirty_l2_ms=0.13, sdpa_flash_dense_dirty_l2_ms=0.16)]
    table = readme_tables.kernel_table(dict(COMMITTED, rows=[row], decode=decode))
    assert "| path | portable Triton kernel ms | Hopper path, one CTA per tile ms |" in table
    assert "| hopper | 1.500 | 1.250 |" in table
    assert "| 128K | random | 0.100 | 120.0 | 450 | 0.11 | 150.0 | 0.80 | 200.0 |" in table  # a file before plans
    table = readme_tables.kernel_table(dict(COMMITTED, rows=[row], decode=dirty))
    assert "| 128K | random | 0.100 | 120.0 | 450 | 0.11 | 150.0 | 0.80 | 130.0 / 160.0 | 200.0 |" in table
    assert "| path |" not in readme_tables.kernel_table(COMMITTED)


def test_the_item_fit_separates_the_cost_per_work_item_from_the_cost_per_block():
    """Times made of 3 SM-us per item and 1.5 per kept block over 132 SMs give back those costs, and render."""
    items, sms = 8192, 132
    rows = [{"seq_len": 32768, "blocks_per_row": k, "items": items, "kept_blocks": items * k,
             "ours_ms": (3.0 * items + 1.5 * items * k) / sms / 1e3,
             "flex_ms": (5.0 * items + 2.0 * items * k) / sms / 1e3} for k in (2, 4, 8, 16)]
    fit = bench_kernel.item_fit(rows, "ours", sms)
    assert abs(fit["per_item_sm_us"] - 3.0) < 1e-6 and abs(fit["per_block_sm_us"] - 1.5) < 1e-6
    fits = {name: bench_kernel.item_fit(rows, name, sms) for name in ("ours", "flex")}
    result = {"rows": rows, "sms": sms, "fit": fits}
    table = "\n".join(readme_tables.item_cost_table(result))
    assert "| 4 | 8192 | 32768 |" in table
    assert "ours 3.00 SM-us per work item and 1.50 per kept block; FlexAttention 5.00" in table


def test_the_read_ceiling_kernel_reads_exactly_the_kept_blocks_of_each_split():
    from read_ceiling import KeptBlockReader

    torch.manual_seed(0)
    key, value = torch.randn(1, 2, 512, 16), torch.randn(1, 2, 512, 16)
    lists = torch.tensor([[0, 3, 4, 6, 7], [1, 2, 5, 6, 7]], dtype=torch.int32)  # 5 of 8 blocks of 64 keys
    reader = KeptBlockReader(key, value, lists, 64)
    out = reader().view(2, reader.splits)
    for kvh in range(2):
        for split in range(reader.splits):
            blocks = lists[kvh, split::reader.splits].tolist()
            keys = [slice(b * 64, (b + 1) * 64) for b in blocks]
            expected = sum((key[0, kvh, rows] * value[0, kvh, rows]).sum() for rows in keys)
            assert torch.allclose(out[kvh, split], torch.as_tensor(expected, dtype=torch.float32), atol=1e-3)
    assert reader.counts.sum().item() == lists.numel()
