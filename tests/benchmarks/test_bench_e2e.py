"""The e2e benchmark's bookkeeping on the CPU: its compile-path runners compute the model, the summary compares
with the faster dense baseline and spreads over the prefill paths, and a later part supersedes an earlier one."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_e2e  # noqa: E402
import e2e_paths  # noqa: E402

from hf_models import build, ids_for  # noqa: E402

K = 1024


@pytest.mark.slow  # compiles with Inductor
@pytest.mark.parametrize("path", e2e_paths.PATHS)
def test_each_path_runner_computes_the_prefill_and_leaves_the_model_as_it_was(path):
    model = build("llama")
    ids = ids_for("llama", n=24)
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
        run, restore = e2e_paths.path_runner(model, path)
        out = run(dict(input_ids=ids))
        restore()
    if path == "generate":  # the first generated token is the prefill's argmax
        assert out.shape == (1, 25) and out[0, -1] == expected[0, -1].argmax()
    else:
        assert torch.allclose(out, expected, rtol=1e-4, atol=1e-5)
    assert "forward" not in model.__dict__


def prefill(variant, length, ms, **extra):
    return dict(model=bench_e2e.HEADLINE_MODEL, variant=variant, batch=1, length=length, ms=ms, peak_mem_gb=ms / 100,
                **extra)


def path_row(path, length, ms):
    return dict(model=bench_e2e.HEADLINE_MODEL, path=path, length=length, ms=ms, layers=8)


def test_summary_divides_the_faster_dense_baseline_and_spreads_over_the_prefill_paths():
    rows = [prefill("eager", 32 * K, 140.0), prefill("inductor", 32 * K, 270.0), prefill("dam-dynamic", 32 * K, 70.0),
            prefill("eager", 128 * K, 1200.0), prefill("dam-dynamic", 128 * K, 400.0),
            dict(model=bench_e2e.HEADLINE_MODEL, variant="inductor", batch=1, length=128 * K, error="OutOfMemoryError")]
    paths = [path_row(p, 32 * K, ms) for p, ms in zip(e2e_paths.PREFILL_PATHS, (100.0, 101.0, 102.0, 104.0))]
    paths.append(path_row("generate", 32 * K, 130.0))  # not a prefill path: outside the spread
    summary = bench_e2e.summarize(rows, [], paths)
    assert summary["prefill_speedup_32k"] == pytest.approx(2.0)  # eager, not inductor
    assert summary["prefill_speedup_vs_inductor_32k"] == pytest.approx(270 / 70)
    assert summary["prefill_speedup_128k"] == pytest.approx(3.0)
    assert summary["prefill_speedup_vs_inductor_128k"] is None
    assert "OutOfMemoryError" in summary["notes"]["prefill_speedup_vs_inductor_128k"]
    assert summary["path_spread_32k"] == pytest.approx(1.04)
    assert summary["path_spread_128k"] is None and "measured paths []" in summary["notes"]["path_spread_128k"]


def test_merge_keeps_the_last_measurement_of_a_case():
    rows = [dict(path="generate", ms=2480.0), dict(path="generate", error="x"), dict(path="generate", ms=1385.0),
            dict(path="static", error="y"), dict(path="static", error="z")]
    kept, dropped = bench_e2e._latest(rows, ("path",))
    assert kept == [dict(path="generate", ms=1385.0), dict(path="static", error="z")]  # one failure per case
    assert len(dropped) == 3
