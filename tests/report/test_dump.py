"""Dumps (report/dump.py): what a user reads to see what the pass did. The backend's log lines:
tests/test_compile_backend.py."""

import json

import torch

from dam_testing import CPU_SPARSE, sdpa


class TwoAttentions(torch.nn.Module):
    def forward(self, q, k, v):
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        b = torch.nn.functional.scaled_dot_product_attention(a, k, v, dropout_p=0.25)
        return a + b


def _qkv():
    return [torch.randn(1, 2, 40, 16) for _ in range(3)]


def test_dump_shows_code_and_site_table(tmp_path):
    torch.compile(TwoAttentions(), backend="dam", options={**CPU_SPARSE, "dump_dir": str(tmp_path)})(*_qkv())
    (folder,) = tmp_path.iterdir()
    assert "scaled_dot_product_attention" in (folder / "before.py").read_text()
    after = (folder / "after.py").read_text()
    assert "dam.sparse_attention" in after and "dam.dense_plan" in after
    assert after.count("scaled_dot_product_attention") == 1  # the dropout call stays
    table = json.loads((folder / "sites.json").read_text())
    assert (table["rewritten"], table["dense"]) == (1, 1)
    assert table["config"]["kernel"] == "reference"
    sparse, dense = table["sites"]
    assert sparse["decision"] == "sparse" and sparse["query"] == "float32[1, 2, 40, 16]" and sparse["is_causal"]
    assert dense["decision"] == "dense" and "dropout_p=0.25" in dense["reason"]
    assert "test_dump.py" in sparse["source"]
    markdown = (folder / "sites.md").read_text()
    assert "1 rewritten, 1 dense" in markdown and "dropout_p=0.25" in markdown


def test_dump_dir_from_environment_and_no_overwrite(tmp_path, monkeypatch):
    monkeypatch.setenv("DAM_DUMP_DIR", str(tmp_path))
    q, k, v = _qkv()
    f = torch.compile(sdpa, backend="dam", options=CPU_SPARSE)
    f(q, k, v, is_causal=True)
    torch._dynamo.reset()
    torch.compile(sdpa, backend="dam", options=CPU_SPARSE)(q, k, v)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph_000", "graph_001"]
