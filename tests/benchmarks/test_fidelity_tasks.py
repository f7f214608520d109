"""The fidelity benchmark's synthetic tasks: exact lengths, facts at the asked depth, one answer derivable from
the prompt."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
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


SMOKE_LABELS = {"full", "dam-default", "dam-pooled@0.3", "dam-last-block@0.3", "dam-calibrated-hybrid",
                "streaming@matched", "streaming@0.3", "oracle@matched", "oracle@0.3", "random@matched", "random@0.3"}


@pytest.mark.slow
def test_fidelity_bench_smoke_scores_through_generate_and_merges_two_seeds(tmp_path, capsys):
    """The pipeline only (tiny models trained for 16 steps on the CPU): no accuracy claim. Every variant is scored
    through generate() with its densities measured on the plans our op ran; the quality check fails and says so;
    the weights go to small shards, load back, and a second seed's parts merge with the first."""
    pytest.importorskip("matplotlib")
    import json

    import bench_fidelity
    from fidelity_lineup import row_label
    from fidelity_weights import SAFE_NAME, SHARD_LIMIT

    common = ["--smoke", "--weights-dir", str(tmp_path / "w")]
    first = bench_fidelity.main([*common, "--out", str(tmp_path / "s0.json")])
    assert first["training"]["0"]["loaded"] is False and (tmp_path / "s0.png").is_file()
    rows = first["rows"]
    assert first["errors"] == [] and {row_label(r) for r in rows} == SMOKE_LABELS
    for r in rows:
        assert r["seed"] == 0 and r["samples"] == 1 and r["length"] in (256, 512) and r["task"] in ft.TASKS
        assert 0.0 <= r["accuracy"] <= 100.0 and 0.0 <= r["accuracy_teacher_forced"] <= 100.0
        assert r["prefill_speedup"] is None and r["speed_note"]  # no timings on the CPU
        sparse = r["variant"] != "full"  # full attention runs no plan; every other variant's plans were measured
        # A dynamic decode row keeps the blocks holding 99% of its mass: all of them, on a model this diffuse.
        assert (0.0 < r["density"] < 1.0 and 0.0 < r["density_decode"] <= 1.0) if sparse else \
            r["density"] == r["density_decode"] == 1.0
    default = {r["length"]: r for r in rows if r["variant"] == "dam-default"}
    for r in rows:
        if r["matched"]:  # the baselines run at the density the default measured, prefill and decode
            wanted = default[r["length"]]["density"]
            if r["variant"] == "streaming":  # rows shorter than the window keep fewer: at most what was asked
                assert wanted - 0.15 < r["density"] <= wanted + 0.01
            else:
                assert abs(r["density"] - wanted) < 0.05
            assert abs(r["density_decode"] - default[r["length"]]["density_decode"]) < 0.05
        elif r["variant"] in ("streaming", "oracle", "random"):
            assert abs(r["density"] - 0.3) < 0.06

    summary = first["summary"]
    assert summary["scored_through_generate"] is True
    assert summary["max_gap_to_full_default"] is not None and summary["max_gap_calibrated_hybrid"] is not None
    assert summary["min_margin_over_streamingllm_default"] is not None
    assert summary["mean_density_default_32k"] is None and "32768" in summary["notes"]["mean_density_default_32k"]
    assert set(summary["by_variant"]) == SMOKE_LABELS - {"full"}
    assert first["quality_check"]["passed"] is False  # 16 steps learn nothing: said in the notes and on stderr
    assert "UNDER-TRAINED" in summary["notes"]["quality_check"]
    assert "has not learned the tasks" in capsys.readouterr().err
    files = list((tmp_path / "w").iterdir())
    assert files and all(f.is_file() and SAFE_NAME.match(f.name) and f.stat().st_size < SHARD_LIMIT for f in files)

    seed1 = [*common, "--seed", "1", "--variants", "full,dam-default,streaming"]
    trained = bench_fidelity.main([*seed1, "--train-only"])["training"]
    assert trained["rounds_done"] == 1 and trained["quality_check"]["passed"] is False
    # Allowing a second round continues the saved weights' training; an eval-only part then loads them.
    second = bench_fidelity.main([*seed1, "--max-train-rounds", "2", "--out", str(tmp_path / "s1.json")])
    again = bench_fidelity.main([*seed1, "--eval-only", "--variants", "full", "--out", str(tmp_path / "s1b.json")])
    assert second["training"]["1"]["loaded"] is False and second["training"]["1"]["rounds_done"] == 2
    assert again["training"]["1"]["loaded"] is True and again["training"]["1"]["rounds_done"] == 2
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in second["rows"] if r["variant"] == "full"]
    assert {r["seed"] for r in second["rows"]} == {1}

    merged = bench_fidelity.main(["--merge", *(str(tmp_path / f) for f in ("s0.json", "s1.json", "s1b.json")),
                                  "--out", str(tmp_path / "m.json")])
    assert len(merged["rows"]) == len(rows) + len(second["rows"]) and set(merged["training"]) == {"0", "1"}
    assert set(merged["quality_check"]["by_seed"]) == {"0", "1"}
    assert json.loads((tmp_path / "m.json").read_text())["summary"] == merged["summary"]
    with pytest.raises(SystemExit, match="no weights"):
        bench_fidelity.main([*common, "--seed", "2", "--eval-only"])
