"""A clone works however a user starts code in it: ``python -c`` or a notebook at its root (an installed or
editable dam-compile), ``PYTHONPATH=<clone>/src``, an editable install, and the benchmarks' own scripts. The code
lives under ``src/``, so the root never offers a top-level ``kernels`` / ``passes``: HuggingFace's hub-kernels
package is ``kernels``, and transformers (5.25 and newer) imports it."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "dam_compile"
# Where this interpreter's dam_compile is (the clone's src/ for an editable install, site-packages otherwise).
INSTALLED = Path(importlib.util.find_spec("dam_compile").origin).parent
BENCHMARKS = ROOT / "benchmarks"
# Benchmark scripts with a command line (the others are their helpers).
BENCHMARK_SCRIPTS = ["bench_cp.py", "bench_e2e.py", "bench_fidelity.py", "bench_kernel.py", "bench_maskgen.py", "bench_plan.py",
                     "bench_real.py", "bench_tp.py", "kernel_resources.py", "readme_tables.py", "real_model.py",
                     "profile_decode.py", "real_texts.py"]

# What a user's first lines do: a transformers model class, HF's kernels (as transformers imports it), then a
# tiny Llama compiled with backend="dam", checked against eager. argv[1]: the folder dam_compile must come from.
USER_SCRIPT = """
import importlib.metadata, sys
from pathlib import Path
import torch
from transformers import LlamaConfig, LlamaForCausalLM
try:
    import kernels
except ModuleNotFoundError:
    kernels = None
try:
    importlib.metadata.distribution("kernels")
    assert hasattr(kernels, "get_kernel"), f"kernels is not HuggingFace's: {kernels!r}"
except importlib.metadata.PackageNotFoundError:  # transformers < 5.25 does not need it
    assert getattr(kernels, "__file__", None) is None, f"kernels is a module of ours: {kernels!r}"
import dam_compile
import dam_compile.kernels, dam_compile.passes
for sub in ("kernels", "passes"):
    folder = Path(getattr(dam_compile, sub).__path__[0]).resolve()
    assert folder == Path(sys.argv[1]).resolve() / sub, f"dam_compile.{sub} from {folder}"
torch.manual_seed(0)
config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=256, attn_implementation="sdpa")
model = LlamaForCausalLM(config).eval()
ids = torch.randint(0, 96, (1, 64))
options = {"mask_source": "dense", "kernel": "reference", "min_seq_len": 0, "block_size": 16,
           "inner_backend": "aot_eager", "dense_layers": 0}
with torch.no_grad():
    expected = model(ids).logits
    actual = torch.compile(model, backend="dam", options=options)(ids).logits
assert dam_compile.graph_reports()[-1].rewritten == 2, dam_compile.graph_reports()
err = ((actual - expected).norm() / expected.norm()).item()
assert err < 1e-5, err
print("user script OK")
"""


def needs_checkout():
    if not (ROOT / "pyproject.toml").is_file():
        pytest.skip("not run from a source checkout")


def run_user_script(python: str, cwd: Path, dam_compile_root: Path, env: dict | None = None):
    run = subprocess.run([python, "-c", USER_SCRIPT, str(dam_compile_root)], capture_output=True, text=True,
                         timeout=600, cwd=cwd, env=env)
    assert run.returncode == 0 and "user script OK" in run.stdout, run.stdout[-2000:] + run.stderr[-4000:]


@pytest.mark.parametrize("name", ["kernels", "passes"])
def test_the_checkout_root_holds_no_package_of_that_name(name):
    """With the clone's root first on ``sys.path``, a regular package of that name found later (HF's ``kernels``)
    still wins: the root offers at most a namespace portion, which never shadows one."""
    needs_checkout()
    spec = importlib.machinery.PathFinder.find_spec(name, [str(ROOT)])
    assert spec is None or spec.origin is None, spec


@pytest.mark.slow
@pytest.mark.parametrize("how", ["python -c at the root", "PYTHONPATH=<clone>"])
def test_a_users_script_in_a_clone_imports_transformers_and_compiles(how, tmp_path):
    needs_checkout()
    if how == "python -c at the root":
        run_user_script(sys.executable, ROOT, INSTALLED)
    else:
        run_user_script(sys.executable, tmp_path, SOURCE, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})


@pytest.mark.slow
def test_an_editable_install_imports_from_the_clone(tmp_path):
    """``pip install -e <clone>`` in a new environment whose other packages are this one's, less dam-compile
    (a folder of links to them): dam_compile, its kernels and passes come from the clone's ``src/``."""
    needs_checkout()
    site = Path(sysconfig.get_path("purelib"))
    dependencies = tmp_path / "dependencies"
    dependencies.mkdir()
    for entry in site.iterdir():
        if not entry.name.startswith(("dam_compile", "__editable__")) and entry.suffix != ".pth":
            (dependencies / entry.name).symlink_to(entry)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    venv_site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip()
    (Path(venv_site) / "dependencies.pth").write_text(f"{dependencies}\n")
    install = subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "-e", str(ROOT)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-3000:]
    run_user_script(python, tmp_path, SOURCE)


# Runs each script as ``python <script> --help`` does (its folder first on sys.path, run as __main__), all in one
# interpreter so that torch and transformers are imported once: prints "<script>: ok" or what went wrong.
SCRIPT_RUNNER = """
import contextlib, io, os, runpy, sys
for script in sys.argv[1:]:
    sys.argv, sys.path[0] = [script, "--help"], os.path.dirname(os.path.abspath(script))
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as stop:
        code = stop.code or 0
    print(f"{script}: {'ok' if code == 0 and 'usage:' in out.getvalue() else f'exit {code}'}", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("cwd", ["benchmarks", "root"])
def test_every_benchmark_script_starts_from_its_folder_and_from_the_root(cwd):
    """``cd benchmarks && python bench_kernel.py --help`` and ``python benchmarks/bench_kernel.py --help``: each
    script finds its helpers beside it and dam_compile wherever it is started."""
    needs_checkout()
    folder = BENCHMARKS if cwd == "benchmarks" else ROOT
    scripts = [str((BENCHMARKS / s).relative_to(folder)) for s in BENCHMARK_SCRIPTS]
    assert sorted(BENCHMARK_SCRIPTS) == sorted(p.name for p in BENCHMARKS.glob("*.py")
                                               if "__main__" in p.read_text())
    # A user's shell, not the suite's (kernel_resources.py refuses Triton's interpreter, which conftest sets).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", SCRIPT_RUNNER, *scripts], capture_output=True, text=True,
                         timeout=600, cwd=folder, env=env)
    assert run.stdout.splitlines() == [f"{script}: ok" for script in scripts], run.stdout + run.stderr[-3000:]
    # And one literally, as a user types it.
    run = subprocess.run([sys.executable, scripts[0], "--help"], capture_output=True, text=True, timeout=300,
                         cwd=folder, env=env)
    assert run.returncode == 0 and "usage:" in run.stdout, run.stderr[-3000:]
