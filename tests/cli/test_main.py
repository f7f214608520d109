"""The ``dam-compile`` command line (cli/main.py): argument checks, option and samples parsing, ``inspect``,
``calibrate`` (with its answer check), ``bench``, the demo's exit code, and the installed package layout. The demo
itself: test_demo.py."""

import argparse
import importlib.metadata
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import dam_compile
from dam_compile.cli import main as cli


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


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "dam_compile.cli.main", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


@pytest.mark.slow
def test_inspect_command_prints_the_sites_and_writes_the_dump(tmp_path):
    pytest.importorskip("matplotlib")
    run = run_cli("inspect", "tiny-llama", "--seq-len", "96", "--dump", "out", "--device", "cpu",
                  "-o", "block_size=16", "-o", "mask_source=streaming", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(r"model\.layers\.1\.self_attn\s+sparse", run.stdout)
    assert "random weights" in run.stdout and (tmp_path / "out" / "index.html").is_file()


@pytest.mark.parametrize("args, message", [
    (["inspect", "no-such-model", "--seq-len", "8"], "is not a built-in name"),
    (["inspect", "tiny-llama", "--seq-len", "0"], "expected a positive integer"),
    (["inspect", "tiny-llama", "--seq-len", "8", "-o", "novalue"], "expected KEY=VALUE"),
    (["inspect", "tiny-llama", "--seq-len", "8", "-o", "blocksize=16", "--no-measure"], "unknown dam option"),
    (["calibrate", "tiny-llama", "--samples", "missing.txt", "--out", "p.safetensors"], "does not exist"),
    (["bench", "nonsense"], "invalid choice"),
])
def test_bad_arguments_exit_2_with_a_message(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        cli.main(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_calibrate_command_writes_a_profile_from_a_samples_file(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(map(str, torch.randint(1, 500, (40,), generator=g).tolist())) for _ in range(3)]
    (tmp_path / "samples.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "profile.safetensors"
    assert cli.main(["calibrate", "tiny-llama", "--samples", str(tmp_path / "samples.txt"), "--pcl", "32",
                     "--out", str(out), "--device", "cpu"]) == 0
    profile = dam_compile.load_profile(out)
    assert profile.pcl == 32 and sorted(profile.modules) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert "2 attention modules" in capsys.readouterr().out


def test_bench_command_runs_the_script_with_quick(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, cwd: calls.append((cmd, cwd)) or 0)
    assert cli.main(["bench", "kernel", "--quick", "--", "--out", "x.json"]) == 0
    (cmd, cwd), = calls
    assert cmd[1].endswith("bench_kernel.py") and cmd[2:] == ["--quick", "--out", "x.json"]
    assert Path(cwd).name == "benchmarks"


def test_model_function_spec_and_missing_function(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_models.py").write_text(
        "import torch\n"
        "from dam_testing import sdpa\n"
        "class M(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return sdpa(x, x, x, is_causal=True)\n"
        "def make():\n"
        "    return M(), {'x': torch.randn(1, 2, 48, 8)}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli.main(["inspect", "my_models:make", "--seq-len", "48", "--device", "cpu", "-o", "block_size=16"]) == 0
    assert "1 rewritten" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        cli.main(["inspect", "my_models:absent", "--seq-len", "8"])
    assert exit_.value.code == 2 and "cannot load 'absent'" in capsys.readouterr().err


def test_calibrate_command_warns_when_the_profile_changes_the_answers(tmp_path, capsys, monkeypatch):
    from dam_compile import answer_check

    g = torch.Generator().manual_seed(0)
    lines = [" ".join(map(str, torch.randint(1, 500, (96,), generator=g).tolist())) for _ in range(3)]
    (tmp_path / "samples.txt").write_text("\n".join(lines) + "\n")
    args = ["calibrate", "tiny-llama", "--samples", str(tmp_path / "samples.txt"), "--pcl", "16", "--min-recall",
            "none", "--out", str(tmp_path / "p.safetensors"), "--device", "cpu"]
    monkeypatch.setattr(answer_check, "MAX_KL", -1.0)  # any change at all counts: the warning must appear
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "answer check on the last sample (96 tokens, 48 positions scored)" in out and "WARNING" in out


@pytest.mark.parametrize("text, expected", [
    ("block_size=64", ("block_size", 64)), ("density=0.25", ("density", 0.25)), ("strict=True", ("strict", True)),
    ("strict=false", ("strict", False)), ("density=None", ("density", None)), ("mask_source=streaming",
                                                                               ("mask_source", "streaming")),
    ("dump_dir=a=b", ("dump_dir", "a=b")), ("profile=", ("profile", "")),
])
def test_option_values_are_read_as_python_values(text, expected):
    value = cli._option(text)
    assert value == expected and type(value[1]) is type(expected[1])


@pytest.mark.parametrize("text", ["novalue", "=3"])
def test_an_option_without_a_key_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="expected KEY=VALUE"):
        cli._option(text)


@pytest.mark.parametrize("text, expected", [("none", None), ("NONE", None), ("0", 0.0), ("0.9", 0.9), ("1", 1.0)])
def test_min_recall_is_none_or_a_fraction(text, expected):
    assert cli._recall(text) == expected


@pytest.mark.parametrize("text", ["1.5", "-0.1", "high"])
def test_min_recall_out_of_range_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="expected a number in \\[0, 1\\] or 'none'"):
        cli._recall(text)


def test_samples_files_of_every_format_give_one_sample_per_row(tmp_path):
    ids = torch.randint(1, 500, (3, 12), generator=torch.Generator().manual_seed(0))
    (tmp_path / "s.txt").write_text("\n".join(" ".join(map(str, row.tolist())) for row in ids) + "\n\n")
    torch.save({"input_ids": ids}, tmp_path / "dict.pt")
    torch.save(ids, tmp_path / "plain.pt")
    save_file({"input_ids": ids}, str(tmp_path / "s.safetensors"))
    parser = argparse.ArgumentParser()
    for name in ("s.txt", "dict.pt", "plain.pt", "s.safetensors"):
        samples = cli._read_samples(parser, tmp_path / name)
        assert len(samples) == 3 and all(s.shape == (1, 12) for s in samples), name
        assert torch.equal(torch.cat(samples), ids), name


@pytest.mark.parametrize("name, write, message", [
    ("s.json", lambda p: p.write_text("[]"), "is not .txt, .pt or .safetensors"),
    ("f.pt", lambda p: torch.save(torch.rand(2, 4), p), "must hold an integer tensor \\[S, L\\]"),
    ("v.pt", lambda p: torch.save(torch.arange(4), p), "must hold an integer tensor"),
    ("k.safetensors", lambda p: save_file({"ids": torch.arange(4)[None]}, str(p)), "cannot read token ids"),
    ("t.txt", lambda p: p.write_text("1 2 x\n"), "cannot read token ids"),
])
def test_bad_samples_files_exit_2_naming_the_file(tmp_path, capsys, name, write, message):
    write(tmp_path / name)
    with pytest.raises(SystemExit) as exit_:
        cli._read_samples(argparse.ArgumentParser(), tmp_path / name)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and re.search(message, err) and name in err
