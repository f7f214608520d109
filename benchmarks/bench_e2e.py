"""End to end on HuggingFace models built from real configs (random weights, no download), one GPU.

Prefill (time to first token) for eager HF (sdpa), ``torch.compile`` with inductor, ours (``backend="dam"``)
with the dense, dynamic and calibrated mask sources, and HF's ``attn_implementation="flex_attention"``; decode
tokens/s on a static KV cache for inductor and ours (both ``mode="reduce-overhead"``: CUDA graphs); compile
time and peak memory for each. Every compiled variant marks the sequence dim dynamic up front, so one compile
serves every length. Times are CUDA-event medians after warmup, fixed seeds.

    python benchmarks/bench_e2e.py                        # everything (long: run it in parts, below)
    python benchmarks/bench_e2e.py --quick                # a 1-minute subset (Llama-3.2-1B shape, 8K and 16K)
    python benchmarks/bench_e2e.py --models llama-3.1-8b --variants eager,inductor,dam-dynamic --out part1.json
    python benchmarks/bench_e2e.py --merge part1.json part2.json ...   # one results file + summary
    python benchmarks/bench_e2e.py --models llama-3.1-8b --variants '' --lengths '' --path-lengths 32768,131072
                                                          # the compile paths a user takes (e2e_paths.py)

Prefill runs with ``use_cache=False`` and ``logits_to_keep=1`` (what ``generate()`` computes for its first
token, minus writing the cache). The calibrated profile comes from ``dam_compile.calibrate`` on random token
ids at PCL 128: with random weights it says nothing about a trained model's patterns, only about speed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import time
from statistics import median
from pathlib import Path

import torch
import torch._inductor.config
from tqdm import tqdm

from bench_common import filled_static_cache, merged_header, result_path, run_metadata, write_result
from e2e_paths import ANSWER_TOKENS, PATHS, PREFILL_PATHS, generate, mark_dynamic, path_runner

import dam_compile
from dam_compile.ops.dispatch import reset_runtime_stats, runtime_stats
from dam_compile.cli.model_specs import build_from_config, hf_config

# The released models' shapes (dam_compile.cli.model_specs holds their configs).
MODELS = ("llama-3.1-8b", "llama-3.2-3b", "llama-3.2-1b", "qwen2-7b", "mistral-7b-v0.3")
VARIANTS = ("eager", "inductor", "dam-dense", "dam-dynamic", "dam-calibrated", "flex")
HEADLINE_MODEL = "llama-3.1-8b"
K = 1024


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--lengths", default="4096,8192,32768,65536,131072", help="prefill lengths (batch 1)")
    p.add_argument("--padded-lengths", default="", help="prefill lengths of a left-padded batch of 4")
    p.add_argument("--decode-kv", default="", help="decode KV lengths (inductor and dam-dynamic)")
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--path-lengths", default="", help="prefill lengths of the compile-paths table (batch 1)")
    p.add_argument("--paths", default=",".join(PATHS), help="which compile paths (e2e_paths.py)")
    p.add_argument("--path-layers", type=int, help="build the paths table's models with this many layers")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--merge", nargs="*", type=Path, help="merge these part files into one results file")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.variants, args.lengths = "llama-3.2-1b", "inductor,dam-dynamic", "8192,16384"
        args.decode_kv, args.decode_steps = "16384", 16
    return args


def build(name: str, attn: str = "sdpa", layers: int | None = None):
    return build_from_config(hf_config(name, attn=attn, layers=layers), device="cuda", dtype=torch.bfloat16)


def cuda_ms(fn, warmup: int, repeats: int) -> list[float]:
    """Milliseconds of each of ``repeats`` runs after ``warmup`` runs (CUDA events)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def repeats_for(length: int) -> tuple[int, int]:
    return (1, 2) if length >= 96 * K else (1, 3) if length >= 48 * K else (2, 5)


def prompt(vocab: int, batch: int, length: int, padded: bool) -> dict:
    g = torch.Generator(device="cpu").manual_seed(length + batch)
    ids = torch.randint(1, vocab, (batch, length), generator=g).cuda()
    inputs = dict(input_ids=ids)
    if padded:  # left padding, as generate() pads: row r loses r/8 of its tokens
        mask = torch.ones_like(ids)
        for r in range(batch):
            mask[r, : r * length // 8] = 0
        inputs["attention_mask"] = mask
    return inputs


def release_memory() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def finish_case(row: dict, rows: list[dict], save, bar) -> None:
    """Record a case (measured or failed), checkpoint the results file, free what the case left."""
    rows.append(row)
    save()
    bar.update(1)
    release_memory()


def make_runner(model, variant: str, profile):
    """A callable running the prefill for ``variant``, and whether it is compiled."""
    def forward(**inputs):
        return model(**inputs, use_cache=False, logits_to_keep=1).logits

    if variant in ("eager", "flex"):
        return forward, False
    if variant == "inductor":
        return torch.compile(forward), True
    options = {"mask_source": variant.removeprefix("dam-")}
    if variant == "dam-calibrated":
        options["profile"] = profile
    return torch.compile(forward, backend="dam", options=options), True


# Where compile time goes (seconds, summed over every graph and nested compile of the first call).
COMPILE_PHASES = {
    "dynamo_total": "_compile.compile_inner", "backend": "OutputGraph.call_user_compiler",
    "aot_autograd": "create_aot_dispatcher_function", "inductor": "compile_fx_inner",
    "triton_compile_wait": "async_compile.wait",
}


def compile_phases() -> dict[str, float]:
    names, values = torch._dynamo.utils.compile_times(repr="csv", aggregate=True)
    times = dict(zip(names, map(float, values)))
    return {label: round(times[key], 2) for label, key in COMPILE_PHASES.items() if key in times}


def calibrated_profile(model, vocab: int):
    g = torch.Generator().manual_seed(1)
    samples = [torch.randint(1, vocab, (1, 128), generator=g).cuda() for _ in range(4)]
    # The paper's calibrated plan (every head on its patterns): this row measures its speed, not answers.
    return dam_compile.calibrate(model, samples, pcl=128, min_recall=None, progress=False)


def prefill_rows(name: str, variants: list[str], lengths: list[int], batch: int, padded: bool, bar, rows: list,
                 save) -> list[dict]:
    model = build(name)
    vocab = model.config.vocab_size
    profile = calibrated_profile(model, vocab) if "dam-calibrated" in variants else None
    for variant in variants:
        torch._dynamo.reset()
        if variant == "flex":
            model.set_attn_implementation("flex_attention")
        run, compiled = make_runner(model, variant, profile)
        for i, length in enumerate(lengths):
            row = dict(model=name, variant=variant, batch=batch, padded=padded, length=length)
            bar.set_postfix_str(f"{name} {variant} {length // K}K b{batch}")
            try:
                inputs = mark_dynamic(prompt(vocab, batch, length, padded)) if compiled else prompt(vocab, batch, length, padded)
                with torch.no_grad():
                    if i == 0:
                        torch._dynamo.utils.compilation_time_metrics.clear()
                        dam_compile.clear_graph_reports()
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        run(**inputs)
                        torch.cuda.synchronize()
                        first_s = time.perf_counter() - t0
                    warmup, repeats = repeats_for(length * batch)
                    reset_runtime_stats()
                    torch.cuda.reset_peak_memory_stats()
                    times = cuda_ms(lambda: run(**inputs), warmup, repeats)
                    row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
                row["ms"] = median(times)
                row["times_ms"] = times
                if i == 0 and compiled:
                    row["compile_s"] = first_s - row["ms"] / 1000
                    row["compile_phases_s"] = compile_phases()
                    if variant.startswith("dam"):
                        row["compile_phases_s"]["dam_pass"] = round(sum(g.pass_s for g in dam_compile.graph_reports()), 2)
                if variant.startswith("dam"):
                    row["paths"] = runtime_stats()
            except Exception as exc:  # a case that fails is recorded with its reason, the run goes on
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            finish_case(row, rows, save, bar)
        if variant == "flex":
            model.set_attn_implementation("sdpa")
    del model
    release_memory()
    return rows


def path_rows(name: str, paths: list[str], lengths: list[int], layers: int | None, bar, rows: list, save
              ) -> list[dict]:
    """Prefill through each compile path a user may take, every length in one compiled object per path (the
    static and reduce-overhead paths compile again per length, as they do for a user). ``layers``: the model's
    first layers only (the paths differ per attention call, not per layer count), or all of them."""
    model = build(name, layers=layers)
    vocab = model.config.vocab_size
    for path in paths:
        torch._dynamo.reset()
        dam_compile.clear_graph_reports()
        run, restore = path_runner(model, path)
        for length in lengths:
            row = dict(model=name, path=path, length=length, layers=model.config.num_hidden_layers)
            bar.set_postfix_str(f"{name} path {path} {length // K}K")
            try:
                inputs = prompt(vocab, 1, length, False)
                with torch.no_grad():
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    run(dict(inputs))
                    torch.cuda.synchronize()
                    first_s = time.perf_counter() - t0
                    warmup, repeats = repeats_for(length)
                    reset_runtime_stats()
                    torch.cuda.reset_peak_memory_stats()
                    times = cuda_ms(lambda: run(dict(inputs)), warmup, repeats)
                    row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
                    row["ms"], row["times_ms"] = median(times), times
                    row["first_call_s"] = first_s
                    row["paths"] = runtime_stats()  # empty where CUDA graphs replayed every call
                    if path == "generate":
                        answer = cuda_ms(lambda: generate(model, dict(inputs), ANSWER_TOKENS), 1, max(1, repeats // 2))
                        row["answer_tokens"], row["answer_ms"] = ANSWER_TOKENS, median(answer)
                sites = [s for g in dam_compile.graph_reports() for s in g.sites]
                row["sites"] = {d: sum(s.decision == d for s in sites) for d in ("sparse", "dense")}
                row["dense_reasons"] = sorted({s.reason for s in sites if s.decision == "dense"})
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            finish_case(row, rows, save, bar)
        restore()
    del model
    release_memory()
    return rows


def decode_rows(name: str, kv_lengths: list[int], steps: int, bar, rows: list, save) -> list[dict]:
    """Decode steps on a static cache filled with random keys/values up to each length."""
    model = build(name)
    for variant in ("inductor", "dam-dynamic"):
        torch._dynamo.reset()
        for kv_len in kv_lengths:
            row = dict(model=name, variant=variant, kv_len=kv_len, steps=steps, cache="static", mode="reduce-overhead")
            bar.set_postfix_str(f"{name} decode {variant} {kv_len // K}K")
            try:
                backend = dict(backend="dam") if variant == "dam-dynamic" else {}
                step = torch.compile(model.forward, mode="reduce-overhead", **backend)
                cache, token = filled_static_cache(model, kv_len, steps + 8, "cuda")
                with torch.no_grad():
                    def one(pos):
                        position = torch.tensor([pos], device="cuda")
                        return step(token, past_key_values=cache, cache_position=position,
                                    position_ids=position[None], use_cache=True).logits

                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for w in range(3):  # compile, CUDA-graph warmup and record
                        one(kv_len + w)
                    torch.cuda.synchronize()
                    row["compile_s"] = time.perf_counter() - t0
                    reset_runtime_stats()
                    torch.cuda.reset_peak_memory_stats()
                    positions = iter(range(kv_len + 3, kv_len + 3 + steps + 2))
                    times = cuda_ms(lambda: one(next(positions)), 1, steps)
                    row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
                row["ms_per_token"] = median(times)
                row["tokens_per_s"] = 1000 / row["ms_per_token"]
                if variant.startswith("dam"):
                    row["paths"] = runtime_stats()  # empty when the steps replayed a CUDA graph
                del cache
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            finish_case(row, rows, save, bar)
    del model
    release_memory()
    return rows


def find(rows: list[dict], **match) -> dict | None:
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()) and "error" not in r:
            return r
    return None


def summarize(prefill: list[dict], decode: list[dict], paths: list[dict] = ()) -> dict:
    """The headline ratios (``../shared/RESULTS.md``), each ``None`` with a reason when not measured. The best
    dense baseline is the faster of eager HF (SDPA) and inductor measured in the run."""
    summary, notes = {}, {}

    def row(variant: str, length: int) -> dict | None:
        return find(prefill, model=HEADLINE_MODEL, variant=variant, length=length, batch=1)

    def best_dense(length: int) -> dict | None:
        measured = [r for r in (row("eager", length), row("inductor", length)) if r]
        return min(measured, key=lambda r: r["ms"]) if measured else None

    def failures(length: int) -> str:
        failed = [r for r in prefill if r.get("model") == HEADLINE_MODEL and r.get("length") == length
                  and r.get("batch") == 1 and "error" in r]
        return "".join(f"; {r['variant']} failed ({r['error'][:120]})" for r in failed)

    def ratio(field: str, length: int, base: dict | None, what: str, ours_over_theirs: bool = False) -> None:
        ours = row("dam-dynamic", length)
        if ours and base:
            summary[field] = ours["ms"] / base["ms"] if ours_over_theirs else base["ms"] / ours["ms"]
            notes[field] = f"against {base['variant']}" + (", the faster dense baseline" if what == "best dense" else "")
        else:
            summary[field] = None
            notes[field] = f"no {HEADLINE_MODEL} dam-dynamic and {what} prefill at {length}" + failures(length)

    for k in (32, 128):
        ratio(f"prefill_speedup_{k}k", k * K, best_dense(k * K), "best dense")
        ratio(f"prefill_speedup_vs_inductor_{k}k", k * K, row("inductor", k * K), "inductor")
    ratio("prefill_ratio_4k", 4 * K, best_dense(4 * K), "best dense", ours_over_theirs=True)
    ours = find(decode, model=HEADLINE_MODEL, variant="dam-dynamic", kv_len=128 * K)
    base = find(decode, model=HEADLINE_MODEL, variant="inductor", kv_len=128 * K)
    summary["decode_ratio_128k"] = ours["tokens_per_s"] / base["tokens_per_s"] if ours and base else None
    notes["decode_ratio_128k"] = ("the dense decode baseline is inductor with CUDA graphs (reduce-overhead)" if ours and base
                                  else f"no {HEADLINE_MODEL} decode at 128K KV for both")
    compiles = {v: find(prefill, model=HEADLINE_MODEL, variant=v, batch=1) for v in ("inductor", "dam-dynamic")}
    if all(r and r.get("compile_s") for r in compiles.values()):
        summary["compile_time_ratio"] = compiles["dam-dynamic"]["compile_s"] / compiles["inductor"]["compile_s"]
    else:
        summary["compile_time_ratio"], notes["compile_time_ratio"] = None, "compile time not measured for both"
    ours, base = row("dam-dynamic", 128 * K), best_dense(128 * K)
    if ours and base:
        summary["peak_mem_ratio_128k"] = ours["peak_mem_gb"] / base["peak_mem_gb"]
        notes["peak_mem_ratio_128k"] = f"against {base['variant']}, the faster dense baseline at 128K"
    else:
        summary["peak_mem_ratio_128k"] = None
        notes["peak_mem_ratio_128k"] = "no 128K prefill of ours and a dense baseline" + failures(128 * K)
    for k in (32, 128):
        field = f"path_spread_{k}k"
        measured = [r for r in paths if r["model"] == HEADLINE_MODEL and r["length"] == k * K
                    and r["path"] in PREFILL_PATHS and "error" not in r]
        times = {r["path"]: r["ms"] for r in measured}
        summary[field] = max(times.values()) / min(times.values()) if len(times) == len(PREFILL_PATHS) else None
        notes[field] = (f"{HEADLINE_MODEL} with {sorted({r['layers'] for r in measured})} layers" if summary[field]
                        else f"{HEADLINE_MODEL} at {k * K}: measured paths {sorted(times)} of {list(PREFILL_PATHS)}")
    summary["notes"] = notes
    return summary


def _latest(rows: list[dict], key: tuple[str, ...]) -> tuple[list[dict], list[dict]]:
    """Per case, the last measured row (parts in the order given: a later part re-measured it), or its last
    failure where none measured it; the dropped rows apart."""
    case = lambda r: tuple(r.get(k) for k in key)  # noqa: E731
    last = {case(r): i for i, r in enumerate(rows) if "error" in r}
    last.update({case(r): i for i, r in enumerate(rows) if "error" not in r})
    kept = [r for i, r in enumerate(rows) if last[case(r)] == i]
    return kept, [r for r in rows if r not in kept]


def merge(parts: list[Path], out: Path | None) -> None:
    loaded, result = merged_header(parts)
    prefill, superseded = _latest([r for part in loaded for r in part["prefill"]], ("model", "variant", "length", "batch"))
    decode, more = _latest([r for part in loaded for r in part["decode"]], ("model", "variant", "kv_len"))
    paths, most = _latest([r for part in loaded for r in part.get("paths", [])], ("model", "path", "length"))
    result.update(config=loaded[0]["config"], prefill=prefill, decode=decode, paths=paths,
                  superseded=superseded + more + most, summary=summarize(prefill, decode, paths))
    write_result(result, "e2e", quick=False, out=out)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.merge:
        merge(args.merge, args.out)
        return
    import transformers

    models = [m for m in args.models.split(",") if m]
    variants = [v for v in args.variants.split(",") if v]
    unknown = [m for m in models if m not in MODELS] + [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown model or variant: {unknown}")
    lengths = [int(n) for n in args.lengths.split(",") if n]
    padded = [int(n) for n in args.padded_lengths.split(",") if n]
    decode_kv = [int(n) for n in args.decode_kv.split(",") if n]
    path_lengths = [int(n) for n in args.path_lengths.split(",") if n]
    paths_run = [p for p in args.paths.split(",") if p]
    if any(p not in PATHS for p in paths_run):
        raise SystemExit(f"unknown path in {paths_run}; known: {PATHS}")
    total = len(models) * (len(variants) * (len(lengths) + len(padded)) + 2 * len(decode_kv)
                           + len(paths_run) * len(path_lengths))
    prefill, decode, paths = [], [], []
    result = run_metadata("e2e")
    result["transformers"] = transformers.__version__
    # Compile times are cold for every variant: a variant compiled later would otherwise reuse the kernels
    # (and graphs) Inductor cached for an earlier one.
    torch._inductor.config.force_disable_caches = True
    defaults = dam_compile.DAMConfig()
    result["config"] = dict(dtype="bfloat16", weights="random (from the released configs)", use_cache=False,
                            logits_to_keep=1, inductor_caches="disabled (cold compiles)",
                            dam_options={k: getattr(defaults, k) for k in (
                                "block_size", "min_seq_len", "density", "estimator", "mass_target", "dense_layers")},
                            calibration="dam_compile.calibrate on 4 random-token samples, PCL 128")
    result.update(prefill=prefill, decode=decode, paths=paths)
    out = result_path("e2e", args.quick, args.out)

    def save() -> None:  # after every case, so a run cut short keeps what it measured
        result["summary"] = summarize(prefill, decode, paths)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")

    with tqdm(total=total, desc="e2e", unit="case") as bar:
        for name in models:
            if lengths:
                prefill_rows(name, variants, lengths, 1, False, bar, prefill, save)
            if padded:
                prefill_rows(name, variants, padded, 4, True, bar, prefill, save)
            if decode_kv:
                decode_rows(name, decode_kv, args.decode_steps, bar, decode, save)
            if path_lengths:
                path_rows(name, paths_run, path_lengths, args.path_layers, bar, paths, save)
    result["summary"] = summarize(prefill, decode, paths)
    write_result(result, "e2e", args.quick, out)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
