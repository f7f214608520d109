"""The package's layers (``[tool.importlinter]`` in pyproject.toml) hold: import-linter checks them, and a planted
upward import makes it fail."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "dam_compile"


def lint_imports(source_root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with the project's contracts over the ``dam_compile`` found in ``source_root``."""
    if not (ROOT / "pyproject.toml").is_file() or not SOURCE.is_dir():
        pytest.skip("not run from a source checkout")
    pytest.importorskip("importlinter")
    env = {**os.environ, "PYTHONPATH": str(source_root)}
    script = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", script, "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def test_the_layers_hold():
    run = lint_imports(ROOT / "src")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout


@pytest.mark.parametrize("planted", [
    ("plan/planted.py", "from dam_compile.kernels import common\n"),  # the plan format reads no kernel
    ("kernels/planted.py", "from dam_compile.ops import dispatch\n"),  # a launcher knows no op
    ("passes/planted.py", "def f():\n    from dam_compile.config import DAMConfig\n"),  # even inside a function
    ("ops/planted.py", "import dam_compile\n"),  # nothing below the face imports the package face
])
def test_an_upward_import_breaks_the_suite(planted, tmp_path):
    shutil.copytree(SOURCE, tmp_path / "dam_compile", ignore=shutil.ignore_patterns("__pycache__"))
    name, code = planted
    (tmp_path / "dam_compile" / name).write_text(code)
    run = lint_imports(tmp_path)
    assert run.returncode != 0 and "BROKEN" in run.stdout, run.stdout[-4000:] + run.stderr[-2000:]
    assert f"dam_compile.{name[:-3].replace('/', '.')}" in run.stdout
