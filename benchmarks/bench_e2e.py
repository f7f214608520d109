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
from tqdm import tqdm

from bench_common import merged_header, result_path, run_metadata, write_result

import dam_compile
from dam_compile.kernels.dispatch import reset_runtime_stats, runtime_stats
from dam_compile.model_specs import build_from_config, hf_config

# The released models' shapes (dam_compile.model_specs holds their configs).
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
    p.add_argument("--quick", action="store_true")
    p.add_argument("--merge", nargs="*", type=Path, help="merge these part files into one results file")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.variants, args.lengths = "llama-3.2-1b", "inductor,dam-dynamic", "8192,16384"
        args.decode_kv, args.decode_steps = "16384", 16
    return args


def build(name: str, attn: str = "sdpa"):
    return build_from_config(hf_config(name, attn=attn), device="cuda", dtype=torch.bfloat16)


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


def mark_dynamic(inputs: dict) -> dict:
    for t in inputs.values():
        torch._dynamo.mark_dynamic(t, 1)
    return inputs


def calibrated_profile(model, vocab: int):
    g = torch.Generator().manual_seed(1)
    samples = [torch.randint(1, vocab, (1, 128), generator=g).cuda() for _ in range(4)]
    return dam_compile.calibrate(model, samples, pcl=128, progress=False)


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


def decode_rows(name: str, kv_lengths: list[int], steps: int, bar, rows: list, save) -> list[dict]:
    """Decode steps on a static cache filled with random keys/values up to each length."""
    from transformers import StaticCache

    model = build(name)
    vocab = model.config.vocab_size
    for variant in ("inductor", "dam-dynamic"):
        torch._dynamo.reset()
        for kv_len in kv_lengths:
            row = dict(model=name, variant=variant, kv_len=kv_len, steps=steps, cache="static", mode="reduce-overhead")
            bar.set_postfix_str(f"{name} decode {variant} {kv_len // K}K")
            try:
                backend = dict(backend="dam") if variant == "dam-dynamic" else {}
                step = torch.compile(model.forward, mode="reduce-overhead", **backend)
                cache = StaticCache(config=model.config, max_cache_len=kv_len + steps + 8)
                ids = torch.randint(1, vocab, (1, 16), device="cuda")
                with torch.no_grad():
                    model(ids, past_key_values=cache, use_cache=True)  # allocates the cache layers
                    for layer in cache.layers:
                        layer.keys.normal_()
                        layer.values.normal_()
                    token = ids[:, -1:]

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


def summarize(prefill: list[dict], decode: list[dict]) -> dict:
    """The headline ratios (``../shared/RESULTS.md``), each ``None`` with a reason when not measured."""
    summary, notes = {}, {}

    def prefill_ratio(field: str, length: int, ours_over_theirs: bool) -> None:
        ours = find(prefill, model=HEADLINE_MODEL, variant="dam-dynamic", length=length, batch=1)
        base = find(prefill, model=HEADLINE_MODEL, variant="inductor", length=length, batch=1)
        if ours and base:
            summary[field] = ours["ms"] / base["ms"] if ours_over_theirs else base["ms"] / ours["ms"]
            return
        summary[field], notes[field] = None, f"no {HEADLINE_MODEL} dam-dynamic and inductor prefill at {length}"
        failed = [r for r in prefill if r.get("model") == HEADLINE_MODEL and r.get("length") == length
                  and r.get("batch") == 1 and "error" in r]
        if failed:
            notes[field] += ": " + "; ".join(f"{r['variant']} failed ({r['error'][:120]})" for r in failed)

    prefill_ratio("prefill_speedup_32k", 32 * K, False)
    prefill_ratio("prefill_speedup_128k", 128 * K, False)
    eager, ours = (find(prefill, model=HEADLINE_MODEL, variant=v, length=128 * K, batch=1) for v in ("eager", "dam-dynamic"))
    if summary["prefill_speedup_128k"] is None and eager and ours:  # the next best baseline, beside the null
        notes["prefill_speedup_128k"] += (f"; eager HF (SDPA, is_causal) / ours = {eager['ms'] / ours['ms']:.2f}x, "
                                          f"peak {ours['peak_mem_gb']:.1f} vs {eager['peak_mem_gb']:.1f} GB")
    prefill_ratio("prefill_ratio_4k", 4 * K, True)
    ours = find(decode, model=HEADLINE_MODEL, variant="dam-dynamic", kv_len=128 * K)
    base = find(decode, model=HEADLINE_MODEL, variant="inductor", kv_len=128 * K)
    summary["decode_ratio_128k"] = ours["tokens_per_s"] / base["tokens_per_s"] if ours and base else None
    if summary["decode_ratio_128k"] is None:
        notes["decode_ratio_128k"] = f"no {HEADLINE_MODEL} decode at 128K KV for both"
    compiles = {v: find(prefill, model=HEADLINE_MODEL, variant=v, batch=1) for v in ("inductor", "dam-dynamic")}
    if all(r and r.get("compile_s") for r in compiles.values()):
        summary["compile_time_ratio"] = compiles["dam-dynamic"]["compile_s"] / compiles["inductor"]["compile_s"]
    else:
        summary["compile_time_ratio"], notes["compile_time_ratio"] = None, "compile time not measured for both"
    mem = {v: find(prefill, model=HEADLINE_MODEL, variant=v, length=128 * K, batch=1) for v in ("inductor", "dam-dynamic")}
    if all(mem.values()):
        summary["peak_mem_ratio_128k"] = mem["dam-dynamic"]["peak_mem_gb"] / mem["inductor"]["peak_mem_gb"]
    else:
        summary["peak_mem_ratio_128k"] = None
        notes["peak_mem_ratio_128k"] = "no 128K prefill of both" + (
            f" ({notes['prefill_speedup_128k'].split(': ', 1)[1]})" if ": " in notes.get("prefill_speedup_128k", "") else "")
    summary["notes"] = notes
    return summary


def _latest(rows: list[dict], key: tuple[str, ...]) -> tuple[list[dict], list[dict]]:
    """Rows with failed ones dropped where a later part measured the same case; the dropped ones apart."""
    measured = {tuple(r.get(k) for k in key) for r in rows if "error" not in r}
    kept = [r for r in rows if "error" not in r or tuple(r.get(k) for k in key) not in measured]
    return kept, [r for r in rows if r not in kept]


def merge(parts: list[Path], out: Path | None) -> None:
    loaded, result = merged_header(parts)
    prefill, superseded = _latest([r for part in loaded for r in part["prefill"]], ("model", "variant", "length", "batch"))
    decode, more = _latest([r for part in loaded for r in part["decode"]], ("model", "variant", "kv_len"))
    result.update(config=loaded[0]["config"], prefill=prefill, decode=decode, superseded=superseded + more,
                  summary=summarize(prefill, decode))
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
    total = len(models) * (len(variants) * (len(lengths) + len(padded)) + 2 * len(decode_kv))
    prefill, decode = [], []
    result = run_metadata("e2e")
    result["transformers"] = transformers.__version__
    result["config"] = dict(dtype="bfloat16", weights="random (from the released configs)", use_cache=False,
                            logits_to_keep=1, dam_options="defaults (block 128, min_seq_len 8192, density 0.15)",
                            calibration="dam_compile.calibrate on 4 random-token samples, PCL 128")
    result.update(prefill=prefill, decode=decode)
    out = result_path("e2e", args.quick, args.out)

    def save() -> None:  # after every case, so a run cut short keeps what it measured
        result["summary"] = summarize(prefill, decode)
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
    result["summary"] = summarize(prefill, decode)
    write_result(result, "e2e", args.quick, out)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
