"""CI must run exactly the README's quick-start commands; the benchmark tables (the full ones in
benchmarks/README.md, the headline in README.md) match the results files."""

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def bench_modules(*names: str) -> list:
    """The benchmark scripts ``names`` as modules (they import each other from their folder); skips outside a
    source checkout, where there are no benchmarks."""
    if not all((BENCHMARKS / f"{name}.py").exists() for name in names):
        pytest.skip("not run from a source checkout")
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return [importlib.import_module(name) for name in names]
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_ci_runs_the_readme_commands():
    if not (ROOT / ".ci" / "run").exists():
        pytest.skip("not run from a source checkout")
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", quick_start, flags=re.S)
    assert len(commands) == 2
    ci_lines = [l for l in (ROOT / ".ci" / "run").read_text().splitlines() if l and not l.startswith(("#", "set ", "cd "))]
    # The README's commands first, verbatim; then only the slow tests that the README's `pytest` leaves out.
    assert ci_lines[:2] == commands
    assert ci_lines[2:] == [".venv/bin/pytest -m slow"]


def test_readme_benchmark_tables_match_the_results_files():
    """The benchmark tables are generated from benchmarks/results/*.json, never edited by hand."""
    if not (BENCHMARKS / "readme_tables.py").exists():
        pytest.skip("not run from a source checkout")
    run = subprocess.run([sys.executable, str(BENCHMARKS / "readme_tables.py"), "--check"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_every_table_has_its_place_and_a_drifted_one_is_caught(tmp_path, monkeypatch):
    """Each generated table sits in its file (the full ones in benchmarks/README.md, the headline in README.md),
    is not empty, and a number edited by hand inside any of them makes the check fail until it is regenerated."""
    (readme_tables,) = bench_modules("readme_tables")
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the real table imports bench_real when it renders
    assert readme_tables.FILES.keys() == {ROOT / "README.md", BENCHMARKS / "README.md"}
    assert set(readme_tables.FILES[BENCHMARKS / "README.md"]()) == set(readme_tables.TABLES)
    headline = readme_tables.FILES[ROOT / "README.md"]()
    assert set(headline) == {"headline"} and headline["headline"].count("\n") > 2
    for path, sections in readme_tables.FILES.items():
        text = path.read_text()
        copy = tmp_path / path.relative_to(ROOT)
        copy.parent.mkdir(parents=True, exist_ok=True)
        for name, body in sections().items():
            start, end = f"<!-- bench:{name}:start -->\n", f"\n<!-- bench:{name}:end -->"
            assert f"{start}{body}{end}" in text, f"{name} is not current in {path.name}"
            number = re.search(r"\d\.\d+", body)
            drifted = text.replace(f"{start}{body}{end}",
                                   f"{start}{body[:number.start()]}9{body[number.start():]}{end}")
            copy.write_text(drifted)
            (current, updated), = readme_tables.updates({copy: sections}).values()
            assert current != updated and updated == text, f"a drifted {name} table in {path.name} passed"


def test_a_maskgen_run_cut_short_keeps_its_overhead_and_says_what_is_missing():
    """bench_maskgen writes its file after the overhead part too: that file summarizes and renders, with the
    mass recall (part 2) marked as not measured rather than made up."""
    bench_maskgen, readme_tables = bench_modules("bench_maskgen", "readme_tables")
    full = json.loads((BENCHMARKS / "results" / "maskgen_h100.json").read_text())
    cut = dict(full, fidelity=[], training=None,
               summary=bench_maskgen.summarize(full["overhead"], [], bench_maskgen.headline_estimator(full)))
    assert cut["summary"]["overhead_vs_dense_32k"] == full["summary"]["overhead_vs_dense_32k"]
    assert cut["summary"]["mass_recall_at_15pct"] is None and "not finished" in cut["summary"]["notes"]["mass_recall_at_15pct"]
    table = readme_tables.maskgen_table(cut)
    assert "| `mass_recall_at_15pct` | not measured |" in table
    assert f"({full['overhead'][1]['dynamic_adaptive_over_dense']:.1%})" in table


def test_a_tp_run_cut_before_one_gpu_summarizes_and_renders_without_made_up_numbers():
    """bench_tp writes its file after each phase: cut after the sharded prefill, the headline fields that need
    the one-GPU phase are null with a reason, and the table renders them as not measured."""
    bench_tp, readme_tables = bench_modules("bench_tp", "readme_tables")
    full = json.loads((BENCHMARKS / "results" / "tp_h200.json").read_text())
    assert bench_tp.summarize(full["prefill"], full["one_gpu"]) == full["summary"]
    cut = dict(full, one_gpu={}, decode=[], summary=bench_tp.summarize(full["prefill"], {}))
    assert all(cut["summary"][f] is None for f in readme_tables.TP_TARGETS)
    table = readme_tables.tp_table(cut)
    assert "| `tp_speedup_retention_128k` | not measured: no prefill of ours" in table
    assert "| `tp_max_rel_err_dense` | not measured: the one-GPU phase did not run |" in table
    assert "One GPU" not in table and "Decode: not measured" in table
