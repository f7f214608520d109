"""``dam_compile.explain`` (explain.py) and the dump's HTML index. The ``inspect`` / ``calibrate`` / ``bench``
commands that print it: tests/cli/test_main.py."""

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

import dam_compile

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
