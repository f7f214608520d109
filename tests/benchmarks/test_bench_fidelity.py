"""The fidelity benchmark's parts without training: the summary and merge of seeds, the weight shards, the eager
baselines' attention through generate(), and the README table."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if not (ROOT / "benchmarks" / "bench_fidelity.py").exists():
    pytest.skip("benchmarks/ is not in this checkout", allow_module_level=True)
sys.path.insert(0, str(ROOT / "benchmarks"))
pytest.importorskip("transformers")

import bench_fidelity as bf  # noqa: E402
import fidelity_eval as fe  # noqa: E402
import fidelity_variants as fv  # noqa: E402
import fidelity_weights as fw  # noqa: E402
import readme_tables  # noqa: E402
from fidelity_summary import summarize, unresolved_errors  # noqa: E402
from dam_compile.plan.plan_stats import PlanStats  # noqa: E402


def row(seed, variant, length, task, accuracy, tf=None, density=0.1, nominal=None, matched=False, speedup=None):
    return dict(seed=seed, variant=variant, matched=matched, nominal_density=nominal, length=length, task=task,
                samples=4, accuracy=accuracy, accuracy_teacher_forced=accuracy if tf is None else tf,
                density=density, density_decode=density / 2, prefill_ms=None, dense_ms=None, dense_path=None,
                prefill_speedup=speedup, speed_note=None)


def two_seed_rows():
    """Seed 1 is the worse seed for the default (gap 25 at 32K); seed 0 the worse margin over StreamingLLM."""
    rows = []
    for seed, (default_32k, streaming_16k) in {0: (100.0, 75.0), 1: (75.0, 25.0)}.items():
        for length in (16384, 32768):
            rows += [row(seed, "full", length, "passkey", 100.0, density=1.0),
                     row(seed, "dam-default", length, "passkey", default_32k if length == 32768 else 100.0,
                         tf=50.0, density=0.14 if length == 16384 else 0.08, nominal=0.15, speedup=2.0),
                     row(seed, "streaming", length, "passkey", streaming_16k if length == 16384 else 0.0,
                         density=0.12, nominal=0.12, matched=True),
                     row(seed, "streaming", length, "passkey", 0.0, tf=0.0, nominal=0.15),
                     row(seed, "dam-pooled", length, "passkey", 90.0, tf=40.0 + 10 * seed, nominal=0.15),
                     row(seed, "dam-calibrated-hybrid", length, "passkey", 99.0 - seed)]
    return rows


PASSED = {"passed": True, "by_seed": {}}


def test_summary_takes_the_worst_seed_and_compares_with_streaming_at_the_matched_density():
    summary = summarize(two_seed_rows(), PASSED)
    assert summary["max_gap_to_full_default"] == 25.0  # seed 1 at 32K
    assert summary["min_margin_over_streamingllm_default"] == 25.0  # seed 0 at 16K: 100 - 75 (not streaming@0.15)
    assert summary["mean_density_default_16k"] == pytest.approx(0.14)
    assert summary["mean_density_default_32k"] == pytest.approx(0.08)
    assert summary["max_gap_calibrated_hybrid"] == 2.0 and summary["scored_through_generate"] is True
    assert summary["max_gap_to_full_at_15pct"] == 60.0  # teacher-forced, dam-pooled@0.15 (the old default)
    assert summary["min_margin_over_streamingllm_at_15pct"] == 40.0
    assert summary["mass_recall_at_15pct"] is None and "generate" in summary["notes"]["mass_recall_at_15pct"]
    assert set(summary["notes"]) == {"mass_recall_at_15pct"}
    by_variant = summary["by_variant"]
    assert list(by_variant) == ["dam-default", "dam-pooled@0.15", "dam-calibrated-hybrid", "streaming@matched",
                                "streaming@0.15"]
    assert by_variant["dam-pooled@0.15"]["min_margin_over_streamingllm"] == 90.0  # against streaming@0.15
    assert by_variant["dam-default"]["mean_prefill_speedup"] == 2.0
    assert by_variant["dam-default"]["max_gap_to_full_teacher_forced"] == 50.0


def test_missing_fields_are_null_with_why_and_an_under_trained_model_is_named():
    rows = [r for r in two_seed_rows() if r["variant"] in ("full", "streaming")]
    failed = {"threshold": 95.0, "passed": False, "accuracy": {"passkey": {"32768": 50.0, "16384": 100.0}}}
    summary = summarize(rows, {"passed": False, "by_seed": {"1": failed}})
    for field in ("max_gap_to_full_default", "mean_density_default_16k", "min_margin_over_streamingllm_default",
                  "max_gap_calibrated_hybrid", "max_gap_to_full_at_15pct"):
        assert summary[field] is None and summary["notes"][field]
    assert "UNDER-TRAINED" in summary["notes"]["quality_check"]
    assert "seed 1: passkey@32768" in summary["notes"]["quality_check"]


def test_a_failing_variant_is_recorded_and_the_others_still_run(monkeypatch, capsys):
    def evaluate_variant(run, variant):
        if variant.name == "dam-default":
            raise RuntimeError("the pass failed")
        return [row(0, variant.name, 16384, "passkey", 100.0, nominal=variant.density)]

    monkeypatch.setattr(fe, "evaluate_variant", evaluate_variant)
    run = fe.Run(None, bf.parse_args(["--variants", "full,dam-default,dam-pooled", "--densities", "0.1"]), "cpu", {})
    fe.evaluate(run, lambda: None)
    assert [r["variant"] for r in run.rows] == ["full", "dam-pooled"]
    assert run.errors == [dict(seed=0, variant="dam-default", error="RuntimeError: the pass failed")]
    assert "dam-default FAILED" in capsys.readouterr().err
    notes = summarize(run.rows, PASSED, run.errors)["notes"]
    assert "the pass failed" in notes["errors"] and "failed" in notes["max_gap_to_full_default"]


def part(tmp_path, name, seed, rows, steps=10):
    training = {str(seed): {"recipe": {"steps": steps, "seed": seed}, "loaded": False}}
    check = {"passed": True, "threshold": 95.0, "accuracy": {}}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(dict(benchmark="fidelity", device="cpu", torch="t", triton="t", python="p",
                                    transformers="x", date=f"2026-01-0{seed + 1}T00:00:00", command=f"python {name}",
                                    config={"lengths": "16384"}, training=training,
                                    quality_check={"passed": True, "by_seed": {str(seed): check}}, rows=rows)))
    return path


def test_merge_joins_seeds_of_one_recipe_and_refuses_other_recipes(tmp_path):
    pytest.importorskip("matplotlib")
    rows = two_seed_rows()
    parts = [part(tmp_path, f"p{s}", s, [r for r in rows if r["seed"] == s]) for s in (0, 1)]
    merged = bf.main(["--merge", *map(str, parts), "--out", str(tmp_path / "m.json")])
    assert len(merged["rows"]) == len(rows)  # same variant, length and task: kept apart by the seed
    assert merged["summary"]["max_gap_to_full_default"] == 25.0 and set(merged["training"]) == {"0", "1"}
    assert merged["config"]["lengths"] == "16384,32768" and (tmp_path / "m.png").is_file()
    other = part(tmp_path, "p2", 1, [], steps=20)
    with pytest.raises(SystemExit, match="recipe"):
        bf.main(["--merge", str(parts[0]), str(other), "--out", str(tmp_path / "m.json")])


def test_merge_drops_an_error_that_a_later_part_measured():
    rows = [dict(seed=0, variant="dam-pooled", matched=False, nominal_density=0.1)]
    failed = [dict(seed=0, variant="dam-pooled@0.1", error="crash"), dict(seed=1, variant="dam-pooled@0.1", error="x")]
    assert unresolved_errors([{"errors": failed}], rows) == failed[1:]


def test_weights_go_to_small_safe_shards_and_load_back_only_when_whole(tmp_path):
    state = {f"layer.{i}.weight": torch.randn(1024, 1024) for i in range(10)}  # 40 MiB in float32
    written = fw.save_weights(state, {"rounds_done": 0}, tmp_path, "fidelity_abc")
    shards = [p for p in written if p.suffix == ".safetensors"]
    assert len(shards) >= 3 and all(p.stat().st_size < fw.SHARD_LIMIT and fw.SAFE_NAME.match(p.name) for p in written)
    loaded, info = fw.load_weights(tmp_path, "fidelity_abc", "cpu")
    assert info["rounds_done"] == 0 and all(torch.equal(loaded[k], v) for k, v in state.items())
    shards[1].unlink()
    assert fw.load_weights(tmp_path, "fidelity_abc", "cpu") is None
    assert fw.load_weights(tmp_path, "fidelity_other", "cpu") is None
    with pytest.raises(ValueError, match="stem"):
        fw.save_weights(state, {}, tmp_path, "a/b")


def call(q_len, kv_len, is_causal=False, mask=None, heads=4, kv_heads=4):
    return dict(query=torch.randn(1, heads, q_len, 8), key=torch.randn(1, kv_heads, kv_len, 8), attn_mask=mask,
                is_causal=is_causal)


def test_call_kind_reads_every_way_hf_states_a_plain_prefill_or_decode_and_refuses_the_rest():
    above = ~torch.ones(6, 6, dtype=torch.bool).tril()
    causal_float = torch.zeros(6, 6).masked_fill(above, torch.finfo(torch.float32).min)
    assert fv.call_kind("a", call(6, 6, is_causal=True, kv_heads=2)) == "prefill"  # 5.24: enable_gqa, no mask
    assert fv.call_kind("a", call(6, 6, mask=causal_float[None, None])) == "prefill"  # a mask saying just causal
    assert fv.call_kind("a", call(1, 9)) == "decode"
    assert fv.call_kind("a", call(1, 9, mask=torch.ones(1, 1, 1, 9, dtype=torch.bool))) == "decode"
    padded = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    padded[..., 0] = False
    for bad in (call(6, 6, mask=padded), call(1, 9, is_causal=True), call(6, 6), call(3, 9, is_causal=True),
                call(1, 9, mask=torch.arange(9)[None, None, None] > 0)):
        with pytest.raises(ValueError, match="unpadded"):
            fv.call_kind("a", bad)


def test_decode_plans_keep_their_budget_and_what_each_baseline_promises():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8).expand(1, 4, 1, 8), torch.randn(1, 2, 16 * 10, 8)
    k[:, :, 16 * 4 + 3] = 50 * q[0, 0, 0]  # block 4 holds a key every head matches strongly
    generator = torch.Generator().manual_seed(0)
    plans = {kind: fv.decode_plan(kind, q, k, 16, 0.3, None, generator) for kind in fv.BASELINES}
    for kind, plan in plans.items():
        assert (plan.kv_num_blocks == 3).all(), kind  # round(0.3 * 10) blocks
    kept = {kind: plan.block_tables(k.shape[-2])[0][..., 0, :] for kind, plan in plans.items()}
    assert kept["streaming"][0, 0].nonzero().flatten().tolist() == [0, 8, 9]  # sink + window ending at the row
    assert kept["oracle"][0, :, 4].all()
    assert kept["random"][0, :, 0].all() and kept["random"][0, :, 9].all()


def tiny_llama():
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("kind", ["oracle", "random"])
def test_baselines_at_full_density_reproduce_generate_through_our_op(kind):
    """Keeping every block (streaming sizes its window to the mean row, so it never does), a baseline's prefill and
    decode steps must give full attention's tokens, and every call must have gone through dam::sparse_attention
    (the recorder saw them, at density 1)."""
    model, ids = tiny_llama(), torch.randint(3, 64, (1, 70))
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(ids, **kwargs)
        with fv.BaselineAttention(model, kind, 1.0, 1.0, 16, kernel="reference"), PlanStats() as stats:
            out = model.generate(ids, **kwargs)
    assert torch.equal(out, expected)
    assert len(stats.prefill) == 2 and len(stats.decode) == 2 * 4
    assert all(d == pytest.approx(1.0) for d in stats.prefill + stats.decode)


def test_baselines_change_the_attention_when_sparse():
    model, ids = tiny_llama(), torch.randint(3, 64, (1, 96))
    with torch.no_grad():
        dense = model(ids).logits
        with fv.BaselineAttention(model, "streaming", 0.2, 0.2, 16, kernel="reference"):
            sparse = model(ids).logits
    assert not torch.allclose(dense, sparse, atol=1e-4)
    assert torch.allclose(dense[:, :32], sparse[:, :32], atol=1e-5)  # the first blocks see all they saw before


def test_readme_renders_generate_scores_with_the_teacher_forced_ones_and_skips_older_files(tmp_path):
    rows = two_seed_rows()
    training = {s: {"recipe": {"steps": 10, "extra_steps": 5, "lengths": "256,32768"}, "rounds_done": 1,
                    "rounds": [{"loss_first": 6.0, "loss_last": 0.1}]} for s in ("0", "1")}
    result = dict(device="NVIDIA H200", torch="2.11", triton="3.6", transformers="5.17", date="2026-01-01T00:00",
                  command="python bench_fidelity.py --out /x/f.json", training=training,
                  config={"model": {"num_hidden_layers": 6, "hidden_size": 512, "num_attention_heads": 8,
                                    "num_key_value_heads": 2}, "samples_per_task": 4, "block_size": 128},
                  quality_check={"passed": True, "by_seed": {}}, rows=rows, summary=summarize(rows, PASSED))
    text = readme_tables.fidelity_table(result)
    # One table per seed: variants are compared within one stand-in, never averaged across seeds.
    seed0, seed1 = text.split("**Seed 1.**")
    assert "| dam-default | passkey | 100 (50) | 100 (50) |" in seed0.split("Seed 0 per task")[1]
    assert "| dam-default | passkey | 100 (50) | 75 (50) |" in seed1.split("Seed 1 per task")[1]
    assert "| `max_gap_to_full_default` | 25.000 | <= 1.0 |" in text and "--out" not in text
    assert "| streaming@matched |" in text and "2.00x" in text
    assert readme_tables.scored_through_generate(result)
    assert not readme_tables.scored_through_generate({"summary": {"max_gap_to_full_at_15pct": 80.0}})
