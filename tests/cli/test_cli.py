"""``dam-compile demo`` as a user runs it, and the installed package layout."""

import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest


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


def test_demo_reports_failure_through_exit_code(monkeypatch):
    from dam_compile.cli import main as cli, demo

    monkeypatch.setattr(demo, "run_demo", lambda **kw: demo.DemoResult(1.0, 1e-4, 1, 1, None, 1, 4, 0))
    assert cli.main(["demo"]) == 1


def test_passes_and_kernels_install_inside_dam_compile():
    dist = importlib.metadata.distribution("dam-compile")
    assert dist.read_text("top_level.txt").split() == ["dam_compile"]
    for sub in ("passes", "kernels"):
        spec = importlib.util.find_spec(f"dam_compile.{sub}")
        assert spec is not None and Path(spec.origin).parent.name == sub
