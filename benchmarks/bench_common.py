"""Shared pieces of the benchmark scripts: the timer, run metadata and where results go."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import shlex
import sys
import time
from pathlib import Path

import torch
import triton

RESULTS = Path(__file__).resolve().parent / "results"


def bench_ms(fn, expected_ms: float | None = None) -> float:
    """Median milliseconds of ``fn`` (``triton.testing.do_bench``: CUDA events, L2 flushed between runs). Long
    runs get fewer repeats; at least ~8 timed runs everywhere."""
    rep = 400 if expected_ms is None else max(400, 8 * expected_ms)
    return triton.testing.do_bench(fn, warmup=max(50, 2 * (expected_ms or 0)), rep=rep, return_mode="median")


def synced_wall_ms(fn, runs: int, warmups: int = 1) -> list[float]:
    """Wall milliseconds of each of ``runs`` calls of ``fn`` after ``warmups`` calls, the device synchronised before
    and after each (host and GPU time together, nothing overlapped: what a whole prefill or generate() costs)."""
    for _ in range(warmups):
        fn()
    times = []
    for _ in range(runs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def int_list(text: str) -> list[int]:
    """``"4096,8192"`` -> ``[4096, 8192]`` (empty entries skipped: ``""`` is none)."""
    return [int(x) for x in text.split(",") if x]


def parse_with_smoke(parser: argparse.ArgumentParser, argv: list[str] | None, smoke: dict,
                     variants: tuple[str, ...]) -> argparse.Namespace:
    """Parse ``argv`` with ``--smoke``'s defaults applied when it is given (options beside it still apply), and
    ``--variants`` checked against ``variants``."""
    if "--smoke" in (sys.argv[1:] if argv is None else argv):
        parser.set_defaults(**smoke)
    args = parser.parse_args(argv)
    unknown = set(filter(None, args.variants.split(","))) - set(variants)
    if unknown:
        parser.error(f"--variants: unknown {', '.join(sorted(unknown))}")
    return args


def run_metadata(benchmark: str) -> dict:
    """Device, versions, date and the exact command, as every results file carries them."""
    return {
        "benchmark": benchmark,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + shlex.join(sys.argv),  # quoted: an empty option value stays visible
    }


def merged_header(parts: list[Path], same: dict | None = None) -> tuple[list[dict], dict]:
    """Load result files run in parts: ``(parts' dicts, the merged file's metadata)``: the first part's device
    and versions, the latest date, the commands joined with ``&&``. Exits naming the field when the parts differ
    in device or in any ``same`` field (name -> function of a part)."""
    loaded = [json.loads(p.read_text()) for p in parts]
    for field, read in {"device": lambda p: p["device"], **(same or {})}.items():
        seen = {json.dumps(read(p), sort_keys=True) for p in loaded}
        if len(seen) != 1:
            raise SystemExit(f"parts differ in {field}: {sorted(seen)}")
    first = loaded[0]
    header = {k: first[k] for k in ("benchmark", "device", "torch", "triton", "python", "transformers")}
    header.update(date=max(p["date"] for p in loaded), command=" && ".join(p["command"] for p in loaded))
    return loaded, header


def gpu_tag(device_name: str | None = None) -> str:
    """``h100`` for an NVIDIA H100 80GB HBM3, and so on: this machine's GPU or the named one (a merge of parts run
    elsewhere); ``cpu`` for a CPU run."""
    if device_name == "cpu" or (device_name is None and not torch.cuda.is_available()):
        return "cpu"
    name = device_name or torch.cuda.get_device_name()
    model = re.search(r"\b([A-Z]+\d+[A-Za-z]*)\b", name.replace("NVIDIA", ""))
    return model.group(1).lower() if model else "gpu"


def result_path(name: str, quick: bool, out: Path | None) -> Path:
    """``out``, or ``benchmarks/results/<name>[_quick]_<gpu or cpu>.json``."""
    return out or RESULTS / f"{name}_{'quick_' if quick else ''}{gpu_tag()}.json"


def write_result(result: dict, name: str, quick: bool, out: Path | None) -> Path:
    """Write ``result`` to :func:`result_path`; print its summary."""
    path = result_path(name, quick, out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {path}")
    return path


def filled_static_cache(model, kv_len: int, room: int, device) -> tuple:
    """``(cache, token)``: a static KV cache of ``kv_len + room`` positions whose layers hold random keys and
    values (the decode benchmarks time steps over it), and a ``[1, 1]`` input token for those steps."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=kv_len + room)
    ids = torch.randint(1, model.config.vocab_size, (1, 16), device=device)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)  # allocates the cache layers
        for layer in cache.layers:
            layer.keys.normal_()
            layer.values.normal_()
    return cache, ids[:, -1:]
