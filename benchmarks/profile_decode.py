"""Where a generated token's time goes: ``generate()`` under ``backend="dam"`` against Inductor (issue 43, item 1).

SmolLM2-135M's shape (30 layers, 9 query / 3 KV heads of dim 64; random weights unless ``--gguf``: below the
crossover every decode step runs dense, whatever the weights), bf16, ``model.forward`` compiled with
``dynamic=True`` as ``real_speed.py`` does. Per backend:

- the time of one generated token ((generate of ``--tokens`` - generate of 1) / (tokens - 1), median of 3);
- the prefill with ``attention_mask=ones`` and without (``logits_to_keep=1``), median of 5;
- ``torch.profiler`` over a ``generate()`` of ``PROFILED_TOKENS`` tokens: the host (CPU) time of each op per
  generated step, the top ``--top`` ops, and the GPU time per step, so a gap between the backends is named;
- ``--prefill-lengths``: the prefill with and without the mask at more lengths (the graphs compiled for the
  first, ``dynamic=True``);
- ``--padded``: a left-padded batch of two (a quarter of the second row padding) against eager SDPA, time and
  relative error of the last logits on the valid rows.

    python profile_decode.py [--length 8192] [--gguf FILE]      # on a GPU

Writes ``results/decode_profile_<gpu>.json`` (or ``--out``) with a ``summary``: ``token_ms_ratio`` (ours /
Inductor per token), ``host_ms_per_token_<backend>``, ``masked_prefill_ratio_<len>`` (ours with the
mask / ours without), ``masked_prefill_speedup_vs_eager_<len>``, ``padded_speedup_vs_eager``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from statistics import median

import torch
from torch.profiler import ProfilerActivity, profile

import dam_compile
from bench_common import int_list, run_metadata, synced_wall_ms, write_result
from e2e_paths import generate
from prefill_timing import compiled_forward, prefill_ms
from real_speed import backend_forward, generate_ms

PROFILED_TOKENS = 5
BACKENDS = ("dam_default", "inductor", "eager")  # real_speed.BACKENDS names


def smollm2_shape(gguf: Path | None, length: int):
    """The model: SmolLM2-135M-Instruct from ``gguf`` (``real_model.py``), else its shape with random weights."""
    if gguf is not None:
        import real_model
        return real_model.load(gguf, torch.bfloat16, "cuda", length)[1]
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=1e5,
                         max_position_embeddings=max(8192, length), tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()


def host_profile(model, ids: torch.Tensor, top: int) -> dict:
    """Host and GPU time per generated step of a profiled ``generate()``, and the ops that cost the host most."""
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        generate(model, dict(inputs), PROFILED_TOKENS)
        torch.cuda.synchronize()
    events = prof.key_averages()
    steps = PROFILED_TOKENS  # the prefill is one of them: a bound, compared alike for every backend
    ops = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {
        "host_ms_per_step": sum(e.self_cpu_time_total for e in events) / 1e3 / steps,
        "gpu_ms_per_step": sum(e.self_device_time_total for e in events) / 1e3 / steps,
        "top_host_ops": [{"name": e.key[:90], "self_cpu_us_per_step": e.self_cpu_time_total / steps,
                          "calls_per_step": e.count / steps} for e in ops],
    }


@torch.no_grad()
def padded_batch(model, length: int, runs: int) -> dict:
    """A left-padded batch of two through ours against eager SDPA: times and the last logits' relative error."""
    ids = torch.randint(1, model.config.vocab_size, (2, length), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, : length // 4] = 0
    call = lambda: model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=8).logits  # noqa: E731
    eager_ms = median(synced_wall_ms(call, runs, warmups=1))
    expected = call().float()
    with compiled_forward(model, {}):
        ours_ms = median(synced_wall_ms(call, runs, warmups=2))
        got = call().float()
    return {"eager_ms": eager_ms, "dam_ms": ours_ms, "speedup_vs_eager": eager_ms / ours_ms,
            "rel_err": ((got - expected).norm() / expected.norm()).item()}


def summarize(result: dict) -> dict:
    summary, notes = {}, {}
    got = result["backends"]

    def put(field: str, value, why: str) -> None:
        summary[field] = None if value is None else round(value, 4)
        if value is None:
            notes[field] = why

    both = "dam_default" in got and "inductor" in got
    put("token_ms_ratio", got["dam_default"]["token_ms"] / got["inductor"]["token_ms"] if both else None,
        "ours and Inductor not both timed")
    for name in BACKENDS:
        put(f"host_ms_per_token_{name}", got.get(name, {}).get("profile", {}).get("host_ms_per_step"),
            f"{name} not profiled")
    dam = got.get("dam_default", {})
    eager = got.get("eager", {})
    for n in result["prefill_lengths"]:
        ours, theirs = dam.get("prefill", {}).get(str(n), {}), eager.get("prefill", {}).get(str(n), {})
        tag = f"{n // 1024}k"
        put(f"masked_prefill_ratio_{tag}", ours["masked_ms"] / ours["ms"] if ours else None,
            f"our prefill not timed at {n}")
        put(f"masked_prefill_speedup_vs_eager_{tag}", theirs["masked_ms"] / ours["masked_ms"] if ours and theirs
            else None, f"ours and eager not both timed at {n}")
    put("padded_speedup_vs_eager", result.get("padded", {}).get("speedup_vs_eager"), "--padded not run")
    summary["notes"] = notes
    return summary


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=8192, help="prompt tokens")
    p.add_argument("--tokens", type=int, default=33, help="generated tokens of the timed generate()")
    p.add_argument("--gguf", type=Path, help="SmolLM2's GGUF file (real_model.py --fetch); random weights without")
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help="in order; 'padded' among them runs the padded batch there")
    p.add_argument("--prefill-lengths", default="", help="more prefill lengths, e.g. 32768")
    p.add_argument("--padded", action="store_true", help="also a left-padded batch of two against eager")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    model = smollm2_shape(args.gguf, max([args.length, *int_list(args.prefill_lengths)]))
    ids = torch.randint(1, model.config.vocab_size, (1, args.length), device="cuda")
    result = {**run_metadata("decode_profile"), "transformers": __import__("transformers").__version__,
              "model": "SmolLM2-135M-Instruct" if args.gguf else "SmolLM2-135M's shape, random weights",
              "length": args.length, "tokens": args.tokens, "backends": {},
              "prefill_lengths": [args.length, *int_list(args.prefill_lengths)]}

    def save() -> None:
        result["summary"] = summarize(result)
        write_result(result, "decode_profile", False, args.out)

    for name in args.backends.split(","):
        if name == "padded":  # in the list: run where it stands (a device call's time runs out in order)
            result["padded"] = padded_batch(model, args.length, 5)
            print("padded", result["padded"], flush=True)
            save()
            continue
        start = time.monotonic()
        row = result["backends"].setdefault(name, {})
        with backend_forward(model, name), torch.no_grad():
            dam_compile.reset_runtime_stats()
            generate_ms(model, ids, 2, runs=1)  # compiles the prefill and decode graphs
            first, whole = generate_ms(model, ids, 1), generate_ms(model, ids, args.tokens)
            row.update(generate1_ms=first, generate_ms=whole, token_ms=(whole - first) / (args.tokens - 1))
            row["profile"] = host_profile(model, ids, args.top)
            row["prefill"] = {}
            for n in result["prefill_lengths"]:
                prompt = torch.randint(1, model.config.vocab_size, (1, n), device="cuda")
                row["prefill"][str(n)] = {"masked_ms": prefill_ms(model, prompt, 5, masked=True),
                                          "ms": prefill_ms(model, prompt, 5)}
            if name == "dam_default":
                row["paths"] = dam_compile.runtime_stats()
        row["seconds"] = round(time.monotonic() - start, 1)
        print(name, {k: v for k, v in row.items() if k != "profile"}, flush=True)
        save()
    if args.padded and "padded" not in result:
        result["padded"] = padded_batch(model, args.length, 5)
        print("padded", result["padded"], flush=True)
        save()
    return result


if __name__ == "__main__":
    main()
