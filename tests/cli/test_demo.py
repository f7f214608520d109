"""``dam-compile demo`` (cli/demo.py): it compiles the tiny Llama with ``backend="dam"``, checks it against eager
(or eager with the same plan) and says OK only when the check holds and some attention was rewritten."""

import contextlib
import subprocess
import sys

import pytest

from dam_compile.cli import demo
from dam_compile.cli.tiny_llama import TinyLlamaConfig

SMALL = TinyLlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                        num_kv_heads=2)


def run_small(monkeypatch, **kwargs):
    """run_demo on a two-layer model at 64 tokens on the CPU; returns the result and what it printed."""
    monkeypatch.setattr(demo, "TinyLlamaConfig", lambda: SMALL)
    lines = []
    options = dict(seq_len=64, block_size=16, inner_backend="aot_eager", dump_dir=None, repeats=1,
                   compare_inductor=False, device="cpu", print_fn=lines.append)
    result = demo.run_demo(**{**options, **kwargs})
    return result, "\n".join(lines)


def test_the_demo_checks_the_compiled_model_and_says_ok(monkeypatch):
    """(The dense source, checked against plain eager: the slow test below.)"""
    result, out = run_small(monkeypatch, mask_source="streaming")
    assert result.ok and result.rel_err <= result.tolerance == 1e-4
    assert (result.rewritten, result.dense) == (1, 1)  # layer 0 kept dense (dense_layers=1)
    assert result.inductor_ms is None and result.compile_s > 0 and result.eager_ms > 0
    assert "| layers.1.self_attn |" in out and "reference: kernel='reference'" in out
    assert out.endswith("demo OK") and "relative error vs eager with the same plan:" in out


def test_the_demo_fails_when_the_compiled_model_differs_from_its_check(monkeypatch):
    """A streaming plan checked against plain eager (the oracle replaced by a mode that changes nothing)."""
    monkeypatch.setattr(demo, "SparseReferenceMode", lambda options, model: contextlib.nullcontext())
    result, out = run_small(monkeypatch, mask_source="streaming", seq_len=96, inner_backend="eager")
    assert not result.ok and result.rel_err > 1e-3
    assert out.endswith("demo FAILED")


def test_ok_needs_the_tolerance_and_a_rewritten_site():
    base = dict(rel_err=1e-5, tolerance=1e-4, eager_ms=1.0, compiled_ms=1.0, inductor_ms=None, compile_s=1.0,
                rewritten=2, dense=0)
    assert demo.DemoResult(**base).ok
    assert not demo.DemoResult(**{**base, "rel_err": 2e-4}).ok
    assert not demo.DemoResult(**{**base, "rewritten": 0, "dense": 2}).ok


@pytest.mark.slow
@pytest.mark.parametrize("mask_source", ["dense", "streaming"])
def test_demo_runs_checks_and_dumps(tmp_path, mask_source):
    cmd = [sys.executable, "-m", "dam_compile.cli.main", "demo", "--seq-len", "200", "--inner-backend", "aot_eager",
           "--block-size", "32", "--mask-source", mask_source, "--repeats", "1", "--dump-dir", str(tmp_path / "dump"),
           "--device", "cpu", "--no-compare-inductor"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "| layers.3.self_attn |" in run.stdout and "demo OK" in run.stdout
    assert "reference: kernel='reference'" in run.stdout
    assert (tmp_path / "dump" / "graph_000" / "sites.md").exists()
