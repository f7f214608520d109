"""``dam_compile.explain``, the dump's HTML index and the ``inspect`` / ``calibrate`` / ``bench`` commands."""

import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dam_compile
from dam_compile.cli import main as cli

from dam_testing import sdpa
from hf_models import build, ids_for

TINY = dict(block_size=16, inner_backend="aot_eager", kernel="reference", dense_layers=0)


def llama_report(**options):
    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = dam_compile.explain(model, example_kwargs={"input_ids": ids_for("llama", n=64)}, **{**TINY, **options})
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    return model, report


def test_explain_lists_exactly_the_sdpa_sites_of_a_tiny_llama():
    model, report = llama_report(mask_source="dense", min_seq_len=0)
    assert [s.module_path for s in report.sites] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert all(s.decision == "sparse" and s.source for s in report.sites)
    assert report.graph_count == 1 and report.graph_break_count == 0
    assert report.runtime_paths == {"reference: kernel='reference'": 2}
    # The dense source keeps every visible block: density and recall 1 for every head.
    for name in ("model.layers.0.self_attn", "model.layers.1.self_attn"):
        m = report.measures[name]
        assert len(m.density) == 4 and m.density == pytest.approx([1.0] * 4)
        assert m.recall == pytest.approx([1.0] * 4)
    assert "model.layers.1.self_attn" in str(report)
    assert json.loads(report.to_json())["sites"][0]["module_path"] == "model.layers.0.self_attn"
    assert not model.training and type(model).__name__ == "LlamaForCausalLM"  # not wrapped, not switched


def test_explain_shows_the_dense_first_layer_as_it_runs():
    """Default dense_layers=1: layer 0 is reported dense (density and recall 1, the dense path and why), layer 1
    with its plan."""
    _model, report = llama_report(mask_source="streaming", sink_blocks=1, local_blocks=1, min_seq_len=0,
                                  dense_layers=1)
    first, second = report.measures["model.layers.0.self_attn"], report.measures["model.layers.1.self_attn"]
    assert first.density == pytest.approx([1.0] * 4) and first.recall == pytest.approx([1.0] * 4)
    assert first.path == "dense" and "dense_layers=1" in first.path_reason
    assert second.density == pytest.approx([0.7] * 4)
    assert [s.decision for s in report.sites] == ["dense", "sparse"]


def test_explain_measures_a_sparse_mask_per_head():
    _model, report = llama_report(mask_source="streaming", sink_blocks=1, local_blocks=1, min_seq_len=0)
    m = report.measures["model.layers.0.self_attn"]
    # 64 tokens in blocks of 16: 10 causal-visible blocks, streaming keeps sink + diagonal = 7.
    assert m.density == pytest.approx([0.7] * 4)
    assert all(0.0 < r < 1.0 for r in m.recall)
    assert m.blocks.shape == (4, 4, 4) and int(m.blocks[0].gt(0).sum()) == 7


class DropoutAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x):
        q = self.proj(x).view(1, 2, -1, 8)
        return sdpa(q, q, q, dropout_p=0.1, is_causal=True)


def test_explain_reports_why_a_site_stays_dense():
    report = dam_compile.explain(DropoutAttention(), torch.randn(1, 32, 16), **TINY)
    (site,) = report.sites
    assert site.decision == "dense" and "dropout_p=0.1" in site.reason
    assert "dropout_p=0.1" in str(report)


def test_explain_rejects_bad_arguments():
    with pytest.raises(ValueError, match="block_sizes"):
        dam_compile.explain(build("llama"), ids_for("llama"), block_sizes=16)
    with pytest.raises(TypeError, match="model must be"):
        dam_compile.explain(lambda x: x, torch.ones(1))


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.targets = []

    def handle_starttag(self, tag, attrs):
        self.targets += [v for k, v in attrs if k in ("href", "src")]


def resolved_links(index: Path) -> list[Path]:
    parser = Links()
    parser.feed(index.read_text())
    return [index.parent / t for t in parser.targets]


def test_dump_index_links_every_file_and_they_exist(tmp_path):
    pytest.importorskip("matplotlib")
    _model, report = llama_report(mask_source="streaming", min_seq_len=0, dump_dir=str(tmp_path))
    index = tmp_path / "index.html"
    links = resolved_links(index)
    names = {p.relative_to(tmp_path).as_posix() for p in links}
    assert {"density.png", "masks/model.layers.0.self_attn.png", "graph_000/index.html", "graph_000/after.py",
            "explain.json"} <= names
    assert all(p.is_file() for p in links)
    graph_links = resolved_links(tmp_path / "graph_000" / "index.html")
    assert graph_links and all(p.is_file() for p in graph_links)
    assert "torch.ops.dam.sparse_attention" in (tmp_path / "graph_000" / "after.py").read_text()
    assert report.dump_dirs == [str(tmp_path / "graph_000")]


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


@pytest.mark.slow
def test_dump_of_a_calibrated_model_draws_the_profile(tmp_path):
    pytest.importorskip("matplotlib")
    model = build("llama")
    profile = dam_compile.calibrate(model, [ids_for("llama", n=32)], pcl=16, progress=False)
    dam_compile.explain(model, example_kwargs={"input_ids": ids_for("llama", n=64)}, profile=profile,
                        min_seq_len=0, dump_dir=str(tmp_path), **TINY)
    links = resolved_links(tmp_path / "index.html")
    drawn = {p.relative_to(tmp_path).as_posix() for p in links}
    assert "masks/profile/model.layers.0.self_attn.png" in drawn and all(p.is_file() for p in links)


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


def test_answer_check_of_a_profile_that_keeps_every_key_is_full_attention():
    from dam_compile.answer_check import answer_check

    model = build("llama")
    ids = ids_for("llama", n=256)
    profile = dam_compile.calibrate(model, [ids], pcl=16, min_recall=None, progress=False)
    check = answer_check(model, profile, ids, dense_layers=len(profile.modules))  # every layer dense: exact
    assert check.kl == pytest.approx(0.0, abs=1e-6) and check.top1 == 1.0 and not check.loses_answers
    sparse = answer_check(model, profile, ids, dense_layers=0)  # PCL 16 patterns over 256 tokens drop keys
    assert sparse.kl > 1e-6 and sparse.positions == 128
    with pytest.raises(ValueError, match="input_ids"):
        answer_check(model, profile, ids[0])
