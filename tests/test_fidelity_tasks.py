"""The fidelity benchmark's synthetic tasks: exact lengths, facts at the asked depth, one answer derivable from
the prompt."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if not (ROOT / "benchmarks" / "fidelity_tasks.py").exists():
    pytest.skip("benchmarks/ is not in this checkout", allow_module_level=True)
sys.path.insert(0, str(ROOT / "benchmarks"))

import fidelity_tasks as ft  # noqa: E402


def solve(sample: ft.Sample) -> tuple[list[int], int]:
    """The answer read off the prompt as a program would, and where its fact starts."""
    p = sample.prompt.tolist()
    q = p[len(p) - 1 - p[::-1].index(ft.QUERY):]  # the last question (training rows ask several)
    if sample.task == "passkey":
        at = p.index(ft.PASSKEY)
        return p[at + 1:at + 6], at
    if sample.task == "multikey":
        key = q[2]
        hits = [i for i in range(len(p) - 2) if p[i] == ft.NEEDLE and p[i + 1] == key and p[i + 2] == ft.IS]
        assert len(hits) == 1
        return p[hits[0] + 3:hits[0] + 7], hits[0]
    if sample.task == "kv_lines":
        a, b = q[2], q[3]
        hits = [i for i in range(len(p) - 3) if p[i] == ft.LINE and p[i + 1:i + 4] == [a, b, ft.IS]]
        assert len(hits) == 1
        return p[hits[0] + 4:hits[0] + 7], hits[0]
    name, hops = q[2], 0
    while True:  # follow VAR name = source back to a value
        (at,) = [i for i in range(len(p) - 2) if p[i] == ft.VAR and p[i + 1] == name and p[i + 2] == ft.EQUALS]
        if p[at + 3] in ft.DIGITS:
            return p[at + 3:at + 7], at
        name, hops = p[at + 3], hops + 1


@pytest.mark.parametrize("task", ft.TASKS)
@pytest.mark.parametrize("length", [160, 700])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_sample_has_its_length_and_one_derivable_answer_at_its_depth(task, length, depth):
    sample = ft.make_sample(task, length, depth, seed=length + int(depth * 10))
    assert sample.prompt.shape == (length,) and sample.prompt[0] == ft.BOS and sample.prompt[-1] == ft.ANSWER
    answer, at = solve(sample)
    assert answer == sample.answer.tolist() and all(t in ft.DIGITS for t in answer)
    assert abs(at / length - depth) < 0.15 or task == "var_track" and at / length <= depth + 0.15


def test_samples_are_deterministic_and_differ_by_seed():
    a, b, c = (ft.make_sample("multikey", 300, 0.5, seed=s) for s in (1, 1, 2))
    assert torch.equal(a.prompt, b.prompt) and not torch.equal(a.prompt, c.prompt)


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="task"):
        ft.make_sample("nope", 100, 0.5, 0)
    with pytest.raises(ValueError, match="depth"):
        ft.make_sample("passkey", 100, 1.5, 0)
    with pytest.raises(ValueError, match="cannot hold"):
        ft.make_sample("multikey", 20, 0.5, 0)


def test_training_rows_ask_several_questions_and_put_the_loss_on_their_answers_only():
    ids, labels = ft.training_batch(16, 256, seed=0, questions=8)
    assert ids.shape == labels.shape == (16, 256)
    asked = {}
    kinds = {ft.PASSKEY: "passkey", ft.NEEDLE: "multikey", ft.LINE: "kv_lines", ft.VAR: "var_track"}
    for row, lab in zip(ids, labels):
        kept = (lab != -100).nonzero().flatten().tolist()
        assert torch.equal(row[kept], lab[kept])
        starts = [i for i in kept if i - 1 not in kept]
        task = kinds[int(row[(row == ft.QUERY).nonzero()[0, 0] + 1])]
        assert all(row[i - 1] == ft.ANSWER for i in starts) and len(kept) == ft.ANSWER_LEN[task] * len(starts)
        assert 1 <= len(starts) <= ft.MAX_QUESTIONS[task]
        for i in starts:  # each answer follows its question and is read off the context before it
            answer, _ = solve(ft.Sample(task, row[:i], row[i:i + ft.ANSWER_LEN[task]], 0.0))
            assert answer == row[i:i + ft.ANSWER_LEN[task]].tolist()
        asked[task] = max(asked.get(task, 0), len(starts))
    assert asked.get("multikey", 0) == 6 or asked.get("kv_lines", 0) == 8  # several answers per row
    one, _ = ft.training_batch(16, 256, seed=0, questions=1)
    assert ((one != ft.PAD).sum(-1) == 256).all()


def test_fidelity_bench_smoke_runs_every_variant_and_caches_the_model(tmp_path):
    """The pipeline only (a 20-step tiny model on the CPU): no accuracy claim."""
    pytest.importorskip("matplotlib")
    import bench_fidelity

    args = ["--smoke", "--out", str(tmp_path / "f.json"), "--cache-dir", str(tmp_path / "cache")]
    first = bench_fidelity.main(args)
    assert first["training"]["loaded"] is False and (tmp_path / "f.png").is_file()
    variants = {r["variant"] for r in first["rows"]}
    assert variants == {"full", "dam-dynamic", "dam-dynamic-last-block", "streaming", "oracle", "random", "dam-calibrated-64"}
    for r in first["rows"]:
        assert 0.0 <= r["accuracy"] <= 100.0 and r["samples"] == 2 and r["task"] in ft.TASKS
        if r["nominal_density"] is not None:  # matched variants land near their density, measured on the plans
            assert abs(r["density"] - r["nominal_density"]) < 0.1
            assert all(0.0 < x <= 1.0 for x in r["mass_recall_per_layer"])
    second = bench_fidelity.main(args)
    assert second["training"]["loaded"] is True
    assert [r["accuracy"] for r in second["rows"]] == [r["accuracy"] for r in first["rows"]]


def test_merge_joins_parts_of_one_model_and_recomputes_the_summary(tmp_path):
    pytest.importorskip("matplotlib")
    import json

    import bench_fidelity

    full = dict(variant="full", nominal_density=None, task="passkey", samples=4, density=1.0, mass_recall_per_layer=None)
    dam = dict(variant="dam-dynamic", nominal_density=0.15, task="passkey", samples=4, density=0.12,
               mass_recall_per_layer=[0.9, 1.0])
    part = dict(benchmark="fidelity", device="cpu", torch="t", triton="t", python="p", transformers="x",
                date="2026-01-01T00:00:00", command="python a", config={"lengths": "4096"},
                training={"recipe": {"steps": 1}, "loaded": False})
    parts = []
    for i, (length, accs) in enumerate([(4096, (100.0, 75.0)), (8192, (100.0, 100.0))]):
        rows = [dict(full, length=length, accuracy=accs[0]), dict(dam, length=length, accuracy=accs[1])]
        parts.append(tmp_path / f"p{i}.json")
        parts[-1].write_text(json.dumps(dict(part, rows=rows, training=dict(part["training"], loaded=bool(i)))))
    merged = bench_fidelity.main(["--merge", *map(str, parts), "--out", str(tmp_path / "m.json")])
    assert merged["config"]["lengths"] == "4096,8192" and len(merged["rows"]) == 4
    assert merged["summary"]["max_gap_to_full_at_15pct"] == 25.0 and merged["training"]["loaded"] is False
    assert (tmp_path / "m.png").is_file()
    other = json.loads(parts[1].read_text())
    other["training"]["recipe"] = {"steps": 2}
    parts[1].write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="recipe"):
        bench_fidelity.main(["--merge", *map(str, parts), "--out", str(tmp_path / "m.json")])
