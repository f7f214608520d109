"""Prefill timing shared by the fidelity benches: a model's forward compiled with our backend or Inductor, the
median time of one prefill, and full attention's best dense path (eager SDPA or Inductor)."""

from __future__ import annotations

import contextlib
from statistics import median
from typing import Iterator

import torch

import dam_compile
from bench_common import synced_wall_ms


@contextlib.contextmanager
def compiled_forward(model, options: dict | None, mode: str | None = None) -> Iterator[None]:
    """``model.forward`` compiled with the ``dam`` backend (``None``: with Inductor), once for every length
    (``dynamic=True``), in ``torch.compile``'s ``mode``; ``generate()`` then runs it for the prefill and every
    decode step. Dynamo's caches are reset before and after, so no graph of another variant is reused."""
    torch._dynamo.reset()
    backend = "inductor" if options is None else dam_compile.backend(**options)
    model.forward = torch.compile(model.forward, backend=backend, dynamic=True, mode=mode)
    try:
        yield
    finally:
        model.__dict__.pop("forward", None)
        torch._dynamo.reset()


@torch.no_grad()
def prefill_ms(model, ids: torch.Tensor, runs: int, masked: bool = False) -> float:
    """Median milliseconds of one prefill (``use_cache=False``, ``logits_to_keep=1``: what the first token
    needs) after two warmup calls (compiles included there); ``masked``: with ``attention_mask=ones``, as
    ``generate()`` and most user code call the model."""
    mask = {"attention_mask": torch.ones_like(ids)} if masked else {}
    return median(synced_wall_ms(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1, **mask), runs,
                                 warmups=2))


def dense_baselines(model, prompts: dict[int, torch.Tensor], runs: int) -> dict[int, dict]:
    """Per length, full attention's prefill in eager SDPA and under Inductor, and the faster of the two."""
    times: dict[int, dict] = {n: {} for n in prompts}
    for n, ids in prompts.items():
        times[n]["eager_ms"] = prefill_ms(model, ids, runs)
    with compiled_forward(model, None):
        for n, ids in prompts.items():
            try:
                times[n]["inductor_ms"] = prefill_ms(model, ids, runs)
            except torch.OutOfMemoryError as err:
                times[n]["inductor_error"] = str(err).split("\n")[0][:160]
    for got in times.values():
        got["best"] = min((k for k in ("eager_ms", "inductor_ms") if k in got), key=got.get)
    return times
