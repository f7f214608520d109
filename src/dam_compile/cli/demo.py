"""``dam-compile demo``: compile a small Llama-shaped model with ``backend="dam"`` and check it against eager."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from dam_compile.compile_backend import graph_reports
from dam_compile.report.dump import sites_markdown
from dam_compile.ops.dispatch import reset_runtime_stats, runtime_stats
from dam_compile.reference_mode import SparseReferenceMode
from .tiny_llama import TinyLlama, TinyLlamaConfig


@dataclass
class DemoResult:
    rel_err: float
    tolerance: float
    eager_ms: float
    compiled_ms: float
    inductor_ms: float | None
    compile_s: float
    rewritten: int
    dense: int

    @property
    def ok(self) -> bool:
        return self.rel_err <= self.tolerance and self.rewritten > 0


def _median_ms(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run_demo(
    *,
    seq_len: int | None = None,
    batch: int = 1,
    mask_source: str = "dense",
    kernel: str | None = None,
    inner_backend: str = "inductor",
    block_size: int | None = None,
    min_seq_len: int | None = None,
    dump_dir: str | None = "dam_dump",
    repeats: int = 5,
    compare_inductor: bool = True,
    device: str | None = None,
    seed: int = 0,
    print_fn: Callable[[str], None] = print,
) -> DemoResult:
    """Build :class:`TinyLlama` with random weights, compile it with ``backend="dam"``, compare with eager,
    and time eager, dam and (``compare_inductor``) plain ``torch.compile``.

    On CUDA it runs bf16 at 8K tokens with the default options. On a CPU it runs float32 at 1K tokens with
    ``kernel="reference"`` and ``min_seq_len=0``, so the rewritten graph really runs the block-sparse
    reference (dense SDPA would otherwise be chosen on a CPU). The comparison is with plain eager for
    ``mask_source="dense"``, and with eager attention restricted to the same plan otherwise.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if on_cuda else torch.float32
    seq_len = seq_len or (8192 if on_cuda else 1024)
    options: dict[str, Any] = {"mask_source": mask_source, "inner_backend": inner_backend}
    options["kernel"] = kernel or ("auto" if on_cuda else "reference")
    if not on_cuda and min_seq_len is None:
        min_seq_len = 0
    for name, value in (("min_seq_len", min_seq_len), ("block_size", block_size), ("dump_dir", dump_dir)):
        if value is not None:
            options[name] = value

    torch.manual_seed(seed)
    model = TinyLlama(TinyLlamaConfig()).to(dev, dtype).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (batch, seq_len), device=dev)
    print_fn(f"device {dev} ({dtype}), batch {batch}, {seq_len} tokens, options {options}")

    reset_runtime_stats()
    before = len(graph_reports())
    compiled = torch.compile(model, backend="dam", options=options)
    with torch.no_grad():
        start = time.perf_counter()
        out = compiled(ids)
        compile_s = time.perf_counter() - start
        if mask_source == "dense":
            expected = model(ids)
        else:
            with SparseReferenceMode(options, model):
                expected = model(ids)
        eager_ms = _median_ms(lambda: model(ids), repeats, dev)
        compiled_ms = _median_ms(lambda: compiled(ids), repeats, dev)
        inductor_ms = None
        if compare_inductor:
            baseline = torch.compile(model, backend="inductor")
            baseline(ids)
            inductor_ms = _median_ms(lambda: baseline(ids), repeats, dev)

    rel_err = ((out.double() - expected.double()).norm() / expected.double().norm()).item()
    reports = graph_reports()[before:]
    sites = [s for r in reports for s in r.sites]
    print_fn("\nattention sites:\n" + sites_markdown(sites))
    print_fn("run-time paths of dam::sparse_attention (first call + timed calls):")
    for path, count in sorted(runtime_stats().items()):
        print_fn(f"  {count:4d} x {path}")
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    result = DemoResult(
        rel_err, tolerance, eager_ms, compiled_ms, inductor_ms, compile_s,
        sum(r.rewritten for r in reports), sum(r.dense for r in reports),
    )
    print_fn(f"\nrelative error vs {'eager' if mask_source == 'dense' else 'eager with the same plan'}: "
             f"{rel_err:.2e} (tolerance {tolerance:.0e})")
    print_fn(f"first call (compile + run): {compile_s:.1f} s")
    inductor = "" if inductor_ms is None else f", torch.compile(inductor) {inductor_ms:.2f} ms"
    print_fn(f"median of {repeats}: eager {eager_ms:.2f} ms, dam {compiled_ms:.2f} ms{inductor}")
    if not on_cuda:
        print_fn("(on a CPU the sparse path is the PyTorch reference: a correctness check, not a speedup)")
    for r in reports:
        if r.dump_dir:
            print_fn(f"dump: {r.dump_dir}")
    print_fn("demo " + ("OK" if result.ok else "FAILED"))
    return result
